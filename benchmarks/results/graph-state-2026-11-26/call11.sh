export OUT PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/env.txt
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" >> $OUT/env.txt
timeout 200 python3 -m pytest -q tests/ops/test_cuda_graph.py tests/models/test_graphed.py > $OUT/call11-tests.txt 2>&1; tail -3 $OUT/call11-tests.txt
mkdir -p $OUT/driver
( time timeout 360 python3 benchmarks/decode.py --device cuda --only decode --graph --index tree --decode-lengths 32768 131072 1048576 4194304 12582912 --out $OUT/driver ) > $OUT/call11-decode-driver.log 2>&1
tail -30 $OUT/call11-decode-driver.log
