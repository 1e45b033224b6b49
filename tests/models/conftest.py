import pytest
import torch

from subquad.models import prefill


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


@pytest.fixture
def check_prefill_and_decode():
    """``check(model, ids) -> cache``: a chunked prefill of the first 97 tokens of ``ids`` (chunks of 41),
    then one token at a time, gives the logits of one full forward; returns the cache it filled."""

    def check(model, ids: torch.Tensor):
        with torch.no_grad():
            full = model(ids, use_cache=False).logits
            out = prefill(model, ids[:, :97], chunk_size=41, logits_to_keep=0, progress=False)
            cache, logits = out.past_key_values, [out.logits]
            for i in range(97, ids.shape[1]):
                logits.append(model(ids[:, i : i + 1], past_key_values=cache).logits)
        torch.testing.assert_close(torch.cat(logits, 1), full, atol=2e-5, rtol=1e-4)
        return cache

    return check
