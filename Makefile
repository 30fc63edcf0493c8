# Set-up is part of every target: `make run` and `make test` create .venv and install what is
# missing (idempotent: a stamp per pyproject.toml content makes a second call fast).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RESULTS ?= results

.PHONY: run test lint format install clean bench slurm-deps install-profile

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

# Real data: Debian's dataset-fashion-mnist (70k real images), installed when missing and root.
$(FMNIST):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' or set A2MIM_FASHION_MNIST_DIR"; exit 1; \
	fi

# Real COCO-format annotations (3 VOC photos) for the COCO reader's test; the test skips with the
# reason when this cannot be installed (not root).
LABELME := /usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/annotations.json
$(LABELME):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq labelme-examples; \
	else echo "labelme-examples not installed (needs root): its COCO test will skip"; fi

# The main job: the tiny workflow (workflow/config/tiny.yaml) end to end on real Fashion-MNIST
# with the default profile (local Submitit jobs on this machine), then the HTML report. Tables
# and figures land in results/tiny/{tables,figures}; MLflow in results/tiny/mlflow.db.
SNAKEMAKE := $(VENV)/bin/snakemake
run: install $(FMNIST)
	$(SNAKEMAKE) all_tables
	$(SNAKEMAKE) all_tables --report $(RESULTS)/tiny/report.html
	@for t in $(RESULTS)/tiny/tables/table*.md $(RESULTS)/tiny/tables/audit.md; do echo; cat $$t; done
	@echo; echo "report: $(RESULTS)/tiny/report.html"

# `snakemake --profile a2mim-slurm ...` from the repository root (bare profile names are looked up
# in ~/.config/snakemake, not ./profiles).
install-profile:
	mkdir -p $(HOME)/.config/snakemake
	rm -rf $(HOME)/.config/snakemake/a2mim-slurm
	cp -r profiles/slurm $(HOME)/.config/snakemake/a2mim-slurm

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(SNAKEMAKE) --lint

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# SLURM daemons for the real-cluster tests (Debian packages; skipped with the reason when not root).
slurm-deps:
	@bash .ci/install_slurm.sh

test: install $(FMNIST) $(LABELME) slurm-deps lint
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf $(VENV) $(RESULTS) .pytest_cache .ruff_cache
