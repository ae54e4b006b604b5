# Two entry points: `make demo` (run the model end to end) and `make test` (the test suite).
# Both create or reuse .venv and install kapao with what it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kapao-installed
# CPU-capable torch builds that pip takes from this machine's local index
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
EXTRAS := torch,dev,crowdpose,onnx,openvino,train

.PHONY: demo test test-fast install clean shipped-onnx

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --force-reinstall --no-deps --no-build-isolation --no-binary xtcocotools xtcocotools==1.14.3  # its wheel is built for numpy 1.x
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kapao demo

test: $(STAMP)
	$(PY) -m pytest -q tests
	KAPAO_OPENVINO_TESTS=1 $(PY) -m pytest -q tests/test_openvino.py  # own process, see tests/conftest.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests
	KAPAO_OPENVINO_TESTS=1 $(PY) -m pytest -q tests/test_openvino.py

# re-create the shipped ONNX from the shipped safetensors (after retraining it); tests check they agree
shipped-onnx: $(STAMP)
	$(PY) -c "from kapao.weights.shipped import export_shipped_onnx as e; print(e('src/kapao/assets/kapao_n_synth.onnx'))"

clean:
	rm -rf $(VENV) build src/*.egg-info runs
