# Every target does its own set-up from a fresh clone: a virtual env, CPU torch, the package with all extras.
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
# The CPU build of torch lies on local disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_CPU ?= torch==2.13.0
STAMP := $(VENV)/.installed
DATA ?= data
SEED ?= 0

.PHONY: install serve-env browser demo live test test-all lint bench bench-check bench-serve real-size clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_CPU)
	$(PY) -m pip install -q --disable-pip-version-check -e ".[all]"
	touch $@

install: $(STAMP)

# The serving environment (recon-serve, recon-batch, the Triton repository tests): its own venv, because PyTriton
# pins numpy < 2 while the main one has numpy 2. The package is installed editable with its core dependencies and
# the `serve` extra (PyTriton with its bundled tritonserver, tritonclient, Ray Data, onnxruntime, matplotlib).
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.installed

$(SERVE_STAMP): pyproject.toml Makefile
	test -x $(SERVE_PY) || python3 -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(SERVE_PY) -m pip install -q --disable-pip-version-check -e ".[serve]"
	touch $@

serve-env: $(SERVE_STAMP)

MODEL_DIR ?= engines/subj01
REGRESSOR ?= gru
# The paper's recipe allows 200 epochs (about 15 min here on the demo subject); the demo caps it to stay quick.
GRU_EPOCHS ?= 40

# The main job on the embedded default: simulate -> prepare -> fit both stages of the subject with the shipped
# foundation models -> export to ONNX (fp32 + fp16, validated) -> torch-free recon-infer on the test set ->
# contact sheet (ground truth, stage 1, final) and metrics.
demo: install
	$(BIN)/recon-sim --out $(DATA)/sim-demo --preset demo --seed $(SEED) --overwrite
	$(BIN)/recon-prepare --nsd-root $(DATA)/sim-demo --subject 1 --out $(DATA)/subj01 --overwrite
	$(BIN)/recon-train subject --data $(DATA)/subj01 --model-dir $(MODEL_DIR) --stage all --regressor $(REGRESSOR) \
		--seed $(SEED) --max-epochs $(GRU_EPOCHS)
	$(BIN)/recon-export --model-dir $(MODEL_DIR) --stage all --precision both
	$(BIN)/recon-infer $(DATA)/subj01/test_betas.npy --model-dir $(MODEL_DIR) --engine ort \
		--stimuli $(DATA)/subj01/test_images.npy --out $(DATA)/recon --overwrite
	$(BIN)/recon-eval report --model-dir $(MODEL_DIR) --recon $(DATA)/recon --out $(DATA)/report
	@echo "contact sheet: $(DATA)/recon/contact_sheet.png"
	@echo "report (opens offline): $(DATA)/report/index.html"

# Real time on the demo subject (docs/real-time.md): run 2 of session 1 of its simulated time series replayed at the
# scanner's pace through recon-stream, calibrated on run 1, with the live page at http://127.0.0.1:$(PORT)/ (Ctrl-C
# stops). Makes what is missing first: the demo model (`make demo`) and the time series (recon-sim --timeseries,
# about 450 MB). Each run writes a new folder $(DATA)/live/run02-<UTC time>. SPEED=4: four times the scanner's pace;
# HOLD=S: stop serving S seconds after the run instead of at Ctrl-C.
TS_ROOT ?= $(DATA)/sim-demo-ts
TS_DIR := $(TS_ROOT)/nsddata_timeseries/ppdata/subj01/func1pt8mm
PORT ?= 8765
SPEED ?= 1
CALIBRATION := $(DATA)/live/calibration-$(notdir $(MODEL_DIR))-session01-run01.npz
live: install
	test -f $(MODEL_DIR)/manifest.json || $(MAKE) demo
	test -f $(TS_DIR)/timeseries/timeseries_session01_run02.nii.gz || \
		$(BIN)/recon-sim --out $(TS_ROOT) --preset demo --seed $(SEED) --timeseries --overwrite
	test -f $(CALIBRATION) || \
		$(BIN)/recon-stream --replay $(TS_DIR)/timeseries/timeseries_session01_run01.nii.gz \
		--design $(TS_DIR)/design/design_session01_run01.tsv --model-dir $(MODEL_DIR) \
		--calibrate $(CALIBRATION)
	$(BIN)/recon-stream --replay $(TS_DIR)/timeseries/timeseries_session01_run02.nii.gz \
		--design $(TS_DIR)/design/design_session01_run02.tsv --model-dir $(MODEL_DIR) \
		--calibration $(CALIBRATION) --speed $(SPEED) \
		--out $(DATA)/live/run02-$$(date -u +%Y%m%dT%H%M%SZ) --view --port $(PORT) --stimuli-root $(TS_ROOT) \
		$(if $(HOLD),--view-hold $(HOLD))

# Chromium for the report's headless-browser test (tests/test_report.py): the Debian/Ubuntu package, installed
# with apt-get (through sudo when not root) when no Chromium is on PATH.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; }

# `make test` runs everything but the `slow` tests, the serving and browser tests included: the `serve` tests run
# from the main venv and start recon-serve, tritonserver and Ray in the serving environment, the `browser` tests
# run headless Chromium. To skip them: .venv/bin/pytest -m "not slow and not serve and not browser".
# `make test-all` adds the slow tests (minutes); the markers are listed in pyproject.toml.
test: install serve-env browser
	BRAINRECON_SERVE_VENV=$(SERVE_VENV) $(PY) -m pytest -q -m "not slow"

test-all: install serve-env browser
	BRAINRECON_SERVE_VENV=$(SERVE_VENV) $(PY) -m pytest -q

lint: install
	$(BIN)/ruff check brainrecon train export runtime serve benchmarks tests
	$(BIN)/ruff format --check brainrecon train export runtime serve benchmarks tests

# The demo-model benchmarks (after `make demo`): data, stage 1, and recon-bench with every pipeline and the curves,
# checked against the CI floors; each writes its file in benchmarks/results/ (benchmarks/README.md lists them).
bench: install
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_stage1.py --data $(DATA)/subj01
	$(PY) benchmarks/bench_stage1_runtime.py --model-dir $(MODEL_DIR) --betas $(DATA)/subj01/test_betas.npy
	$(BIN)/recon-bench $(DATA)/subj01/test_betas.npy --model-dir $(MODEL_DIR) --limit 32 --curves 1,4,16,64 \
		--pipelines torch,torch_best,ort_fp32_plain,ort_fp32,openvino_fp32,openvino_bf16 \
		--out benchmarks/results/stage2_runtime.json --check benchmarks/targets.json --note "make demo ($(MODEL_DIR))"

# CI's speed regression check: a tiny simulated subject with the shipped foundation models (real sizes), both
# stages fitted and exported, then the runtime vs the torch reference in one run against benchmarks/targets.json.
BENCH_TMP ?= .bench-check
bench-check: install
	rm -rf $(BENCH_TMP)
	$(BIN)/recon-sim --out $(BENCH_TMP)/sim --preset tiny --seed $(SEED)
	$(BIN)/recon-prepare --nsd-root $(BENCH_TMP)/sim --subject 1 --out $(BENCH_TMP)/prep
	$(BIN)/recon-train subject --data $(BENCH_TMP)/prep --model-dir $(BENCH_TMP)/model --stage all --regressor ridge
	$(BIN)/recon-export --model-dir $(BENCH_TMP)/model --stage all --precision both
	$(BIN)/recon-bench $(BENCH_TMP)/prep/test_betas.npy --model-dir $(BENCH_TMP)/model --repeats 3 \
		--out $(BENCH_TMP)/stage2_runtime.json --check benchmarks/targets.json

# Load and fault benchmark of recon-serve on loopback (bounded: N clients x M requests per setting); results and the
# latency plot in benchmarks/results/serve/. Uses the tiny bench-check model (built by `make bench-check`).
bench-serve: serve-env
	test -f $(BENCH_TMP)/model/manifest.json || $(MAKE) bench-check
	$(SERVE_PY) benchmarks/bench_serve.py --model-dir $(BENCH_TMP)/model --betas $(BENCH_TMP)/prep/test_betas.npy \
		--out benchmarks/results/serve

# The real-size model set (random weights at NSD + Versatile Diffusion sizes): every model exported fp32/fp16 by the
# export's own routine with parity, ORT CPU latency, peak memory and file sizes -> benchmarks/results/real_size.json
# (docs/real-size.md). About 75 min on 2 cores, one model at a time; as in recon-export, a model's fp32 validation
# holds its weights beside the ONNX Runtime session (ridge_k31: 5.7 GB beside an 11 GB session). The ONNX files go
# under engines/real-size.
# ONLY=unet,vae_decoder measures a subset.
real-size: install
	nice $(PY) benchmarks/real_size.py --out benchmarks/results/real_size.json $(if $(ONLY),--only $(ONLY))

# Removes only what these targets make and can make again: the two virtual envs, the test and lint caches, the
# bench-check folder, and the demo's simulated subject, reconstructions and report ($(DATA)/sim-demo, recon,
# report). It keeps engines/ (trained and exported model folders, $(MODEL_DIR)), $(DATA)/subj01 (a prepared subject,
# maybe from real NSD) and anything else under $(DATA): delete those by hand.
clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache $(BENCH_TMP) \
		$(DATA)/sim-demo $(DATA)/recon $(DATA)/report
