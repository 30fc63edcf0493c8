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

install: $(STAMP) install-profile

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

# `snakemake --profile slurm all_tables` from the repository root: Snakemake looks a bare profile
# name up in ~/.config/snakemake (and /etc/xdg/snakemake), not in ./profiles. Installs a copy of
# profiles/slurm there as `slurm`, marked with .a2mim-profile; updates only a copy it made, and
# leaves a `slurm` profile it did not make untouched (says so). Idempotent.
SMK_PROFILE := $${XDG_CONFIG_HOME:-$$HOME/.config}/snakemake/slurm
install-profile:
	@dest="$(SMK_PROFILE)"; \
	if [ -e "$$dest" ] && [ ! -f "$$dest/.a2mim-profile" ]; then \
	  echo "install-profile: $$dest exists and was not installed by a2mim: left as is;" \
	       "use 'snakemake --profile profiles/slurm ...' (or move it away and rerun make)"; \
	else \
	  mkdir -p "$$dest" && \
	  cp profiles/slurm/config.yaml "$$dest/config.yaml.new" && mv "$$dest/config.yaml.new" "$$dest/config.yaml" && \
	  echo "Installed by a2mim's 'make install-profile' from $(CURDIR)/profiles/slurm; updated by it." > "$$dest/.a2mim-profile" && \
	  echo "install-profile: $$dest (snakemake --profile slurm all_tables, from the repository root)"; \
	fi

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
