# autorecbench — `make setup` then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# e.g. BENCH_ARGS="--repeat 5 --methods fixed,esapn --optimizers lazy" (see python -m autorecbench.bench.streaming --help)
BENCH_ARGS ?=
# bench.ctr's options; --fuxictr trains FuxiCTR's DeepFM beside ours (the [bench] extra, which `make setup` installs)
CTR_BENCH_ARGS ?= --fuxictr
SHARED_ML_LATEST_SMALL ?= ../shared/data/ml-latest-small

.PHONY: setup test test-slow test-gpu bench clean-results help reproduce-table1 reproduce-autoloss-table2

help:
	@echo "make setup      create $(VENV), install torch $(TORCH_VERSION) (CPU build, unless a torch is already there),"
	@echo "                the package with dev extras, and the default dataset ml-100k (from the recbole wheel)"
	@echo "make test       the test suite without slow tests (CPU, < 10 minutes on 2 cores)"
	@echo "make test-slow  the slow tests too"
	@echo "make bench      streaming throughput and peak memory on a synthetic stream; CTR preprocessing"
	@echo "                (5M Criteo-format rows: rows/s, peak RSS) and DeepFM training samples/s; Alimama"
	@echo "                behaviour-log preparation (25M and 50M rows: rows/s, peak RSS, extrapolated to 723M)"
	@echo "                and DIN training samples/s; checkpoint cost. Every figure with its ratio to README"
	@echo "                \"Speed\" (bench/reference.yaml) and a hardware line; DeepFM's FLOP/s against the"
	@echo "                matmul rate and FuxiCTR's DeepFM on the same rows (CTR_BENCH_ARGS=--fuxictr, default)"
	@echo "make reproduce-table1 [DATA=ml-latest-small|ml-100k] [SEEDS=0,1,2] [JOBS=2]"
	@echo "                the ESAPN paper's Table 1 grid (ml-20m and ml-latest by default), printed beside the paper"
	@echo "make reproduce-autoloss-table2 [ARGS='--small' | ARGS='--seeds 0,1,2 device=cuda']"
	@echo "                AutoLoss Table 2 (+ Table 3's AL-1/AL-2): Criteo, ML-20m x DeepFM, IPNN, beside the paper"
	@echo "make reproduce-NAME [ARGS=...]  any registered reproduction (autorecbench reproduce --help lists them)"

setup: $(VENV)/.installed data/raw/ml-100k/ml-100k.inter data/raw/ml-latest-small/ratings.csv

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# Keep a torch that is already installed (e.g. a CUDA build); else the CPU build from local disk.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

data/raw/ml-100k/ml-100k.inter: | $(VENV)/.installed
	$(BIN)/autorecbench data fetch ml-100k

# ml-latest-small is redistributable; copy it in when the shared folder is beside the checkout.
data/raw/ml-latest-small/ratings.csv: | $(VENV)/.installed
	@if [ -f $(SHARED_ML_LATEST_SMALL)/ratings.csv ]; then \
		$(BIN)/autorecbench data fetch ml-latest-small --from $(SHARED_ML_LATEST_SMALL); \
	else echo "ml-latest-small: $(SHARED_ML_LATEST_SMALL) not found; see README for the download"; fi

# `make test` workers (pytest-xdist); a module's tests stay on one worker, so its shared fixtures are built once.
# `make test-slow` stays serial: its checks report CPU time and memory of one process at a time.
TEST_WORKERS ?= 2

test:
	$(BIN)/python -m pytest -m "not slow" -q -n $(TEST_WORKERS) --dist loadfile

test-slow:
	$(BIN)/python -m pytest -q

test-gpu:
	$(BIN)/python -m pytest -m gpu -q

bench:
	$(BIN)/python -m autorecbench.bench.streaming $(BENCH_ARGS)
	$(BIN)/python -m autorecbench.bench.ctr $(CTR_BENCH_ARGS)
	$(BIN)/python -m autorecbench.bench.checkpoint
	$(BIN)/python -m autorecbench.bench.alimama

# ESAPN paper Table 1: FIXED, DARTS, AutoEmb, ESAPN x binary, multiclass x DATA (default: ml-20m,ml-latest).
DATA ?= ml-20m,ml-latest
SEEDS ?= 0
JOBS ?= 1
reproduce-table1:
	$(BIN)/autorecbench reproduce table1 --data $(DATA) --seeds $(SEEDS) --jobs $(JOBS)

# AutoLoss (KDD 2021) Table 2: `autorecbench reproduce autoloss-table2 --help` for the options.
reproduce-autoloss-table2:
	$(BIN)/autorecbench reproduce autoloss-table2 $(ARGS)

# Any other registered reproduction (`autorecbench reproduce --help` lists them): make reproduce-NAME ARGS='...'
reproduce-%:
	$(BIN)/autorecbench reproduce $* $(ARGS)

clean-results:
	rm -rf results logs
