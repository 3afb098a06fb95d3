# Two entry points, both doing all set-up on a fresh machine (Python 3.11, no GPU):
#   make demo   build, validate and bench the built-in demo DiT on ONNX Runtime (CPU)
#   make test   lint, type-check and run the test suite (which builds the docs site strictly)
#   make docs   the documentation site (mkdocs.yml, docs/) into site/
#   make quality  the README's quality table, plot and grid (docs/assets/) from demo-digits' trained weights
#   make quality-flow  the same for demo-digits-flow (the flow-matching SD3 digit model)
# CPU PyTorch is installed explicitly. Where no local wheel provides torch==2.13.0+cpu:
#   make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"

PYTHON ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0+cpu
TENSORRT_STUBS ?= tensorrt-stubs==10.13.0.35.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo quality quality-flow quality-policies test lint typecheck clean

$(STAMP): pyproject.toml runtime/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ./runtime -e ".[dev]"
	# The stubs declare a dependency on tensorrt itself, which has no wheel here.
	$(BIN)/pip install -q --no-deps "$(TENSORRT_STUBS)"
	# mypy ignores the stubs where pip puts them (no py.typed): a repaired copy in .typings/.
	$(BIN)/python tools/trt_typings.py
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/fora-export build demo-dit --out engines/demo-dit --force
	$(BIN)/fora-export validate engines/demo-dit
	$(BIN)/fora-export bench engines/demo-dit --steps 20

# Every schedule samples all QUALITY_SAMPLES x 10 digits in one generation. The lists: full
# at step 0 only (broken on purpose), then 13 full steps (as N=4) front- and back-loaded.
QUALITY_SAMPLES ?= 50
QUALITY_REPEATS ?= 5
QUALITY_OUT ?= docs/assets
quality: $(STAMP)
	$(BIN)/fora-export build demo-digits --out engines/demo-digits --batch 1:$(QUALITY_SAMPLES)0:$(QUALITY_SAMPLES)0 --force
	$(BIN)/fora-export quality engines/demo-digits --samples $(QUALITY_SAMPLES) --steps 50 --repeats $(QUALITY_REPEATS) \
		--schedule-list 0 --schedule-list 0,1,2,3,4,6,8,11,15,20,26,33,41 \
		--schedule-list 0,9,17,24,30,35,39,42,44,46,47,48,49 \
		--save-json $(QUALITY_OUT)/quality.json --plot $(QUALITY_OUT)/quality.png --grid $(QUALITY_OUT)/quality-grid.png

# The same schedules on the flow-matching model (its own scheduler, shift 3, and class tables).
quality-flow: $(STAMP)
	$(BIN)/fora-export build demo-digits-flow --out engines/demo-digits-flow --batch 1:$(QUALITY_SAMPLES)0:$(QUALITY_SAMPLES)0 --force
	$(BIN)/fora-export quality engines/demo-digits-flow --samples $(QUALITY_SAMPLES) --steps 50 --repeats $(QUALITY_REPEATS) \
		--schedule-list 0 --schedule-list 0,1,2,3,4,6,8,11,15,20,26,33,41 \
		--schedule-list 0,9,17,24,30,35,39,42,44,46,47,48,49 \
		--save-json $(QUALITY_OUT)/quality-flow.json --plot $(QUALITY_OUT)/quality-flow.png \
		--grid $(QUALITY_OUT)/quality-flow-grid.png

# Static FORA, calibrated, forecast and calibrated + forecast at each N's full-step count, on
# both trained models: a forecast build (its static rows run with the forecast off),
# calibrated on 100 samples of other noise (seed 1) than the scored ones (seed 0).
quality-policies: $(STAMP)
	$(BIN)/fora-export build demo-digits --out engines/demo-digits-forecast --batch 1:$(QUALITY_SAMPLES)0:$(QUALITY_SAMPLES)0 --forecast --force
	$(BIN)/fora-export calibrate engines/demo-digits-forecast --steps 50 --full-steps 13 --samples 100 --seed 1
	$(BIN)/fora-export quality engines/demo-digits-forecast --samples $(QUALITY_SAMPLES) --steps 50 --repeats $(QUALITY_REPEATS) \
		--intervals 1,2,3,4,5,7,10 --schedule-mode paper --policies static,calibrated,forecast,calibrated+forecast \
		--save-json $(QUALITY_OUT)/quality-policies.json --plot $(QUALITY_OUT)/quality-policies.png \
		--grid $(QUALITY_OUT)/quality-policies-grid.png
	$(BIN)/fora-export build demo-digits-flow --out engines/demo-digits-flow-forecast --batch 1:$(QUALITY_SAMPLES)0:$(QUALITY_SAMPLES)0 --forecast --force
	$(BIN)/fora-export calibrate engines/demo-digits-flow-forecast --steps 50 --full-steps 13 --samples 100 --seed 1
	$(BIN)/fora-export quality engines/demo-digits-flow-forecast --samples $(QUALITY_SAMPLES) --steps 50 --repeats $(QUALITY_REPEATS) \
		--intervals 1,2,3,4,5,7,10 --schedule-mode paper --policies static,calibrated,forecast,calibrated+forecast \
		--save-json $(QUALITY_OUT)/quality-flow-policies.json --plot $(QUALITY_OUT)/quality-flow-policies.png \
		--grid $(QUALITY_OUT)/quality-flow-policies-grid.png

# The documentation site, from mkdocs.yml and docs/, into site/ (ignored). `make test` builds
# it too, with --strict, in tests/docs/test_site.py.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python -m pytest -rs

clean:
	rm -rf $(VENV) engines/*/ .pytest_cache .mypy_cache .ruff_cache
