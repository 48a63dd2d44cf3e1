# kclip_ds — two commands:  `make demo` (set up + run the built-in demo)  and  `make test` (the suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
RUN    ?= runs/demo
DATA   ?= data/demo
EXPORT ?= exports/demo-hf
PORT   ?= $(shell $(PYTHON) -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# CPU ranks: DeepSpeed's CPU accelerator over gloo, one thread per rank.  Unset both on a GPU node.
CPU_ENV := DS_ACCELERATOR=cpu OMP_NUM_THREADS=1

.PHONY: demo test venv data clean-demo lint

$(BIN)/.kclip-installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.kclip-installed

data: venv
	$(BIN)/python tools/make_demo_data.py --out $(DATA) --seed 0

# make shards → train on 2 ranks with DeepSpeed → evaluate on the held-out test split → export to HF
demo: data
	rm -rf $(RUN) $(EXPORT)
	$(CPU_ENV) $(BIN)/deepspeed --num_accelerators 2 --master_port $(PORT) --module kclip_ds.train \
		--config configs/demo.yaml train.output_dir=$(RUN) $(ARGS)
	$(CPU_ENV) $(BIN)/kclip-eval --run-dir $(RUN) --split test
	$(CPU_ENV) HF_HUB_OFFLINE=1 $(BIN)/python tools/convert_to_hf.py --run-dir $(RUN) --out $(EXPORT)

test: venv
	$(CPU_ENV) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check kclip_ds tools tests bench

clean-demo:
	rm -rf $(RUN) $(DATA) $(EXPORT)
