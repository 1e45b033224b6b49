import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def check_padded_batch():
    """``check(model, max_new_tokens)``: greedy generation of a left-padded batch of two prompts (90 and 61
    tokens) gives each row exactly what it gives alone."""

    def check(model, max_new_tokens: int) -> None:
        rows = [torch.randint(1, 256, (1, n)) for n in (90, 61)]
        padded = torch.zeros(2, 90, dtype=torch.long)
        mask = torch.zeros(2, 90, dtype=torch.long)
        for r, row in enumerate(rows):
            padded[r, 90 - row.shape[1] :], mask[r, 90 - row.shape[1] :] = row, 1
        kw = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
        batched = model.generate(padded, attention_mask=mask, **kw)
        for r, row in enumerate(rows):
            assert torch.equal(batched[r, 90:], model.generate(row, **kw)[0, row.shape[1] :])

    return check
