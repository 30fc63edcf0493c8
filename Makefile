# Set-up is part of every target: `make run` and `make test` create .venv and install what is
# missing (idempotent: a stamp per pyproject.toml content makes a second call fast).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
RESULTS ?= results

.PHONY: run test lint format install clean bench slurm-deps

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

# Until the Snakemake workflow lands, `make run` runs the most complete real job that exists, on
# real Fashion-MNIST at toy scale: A²MIM and SimMIM pre-training (reconstruction figures), then
# fine-tuning of each encoder and of a from-scratch baseline with the same budget, and linear
# probes of both encoders. Every run logs to MLflow (results/mlflow.db).
TINY_DATA := --set data.root=$(RESULTS)/data/fashion-mnist-tiny --set progress=false
RUNS := $(RESULTS)/runs

# Real COCO-format annotations (3 VOC photos) for the COCO reader's test; the test skips with the
# reason when this cannot be installed (not root).
LABELME := /usr/share/doc/labelme-examples/examples/instance_segmentation/data_dataset_coco/annotations.json
$(LABELME):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq labelme-examples; \
	else echo "labelme-examples not installed (needs root): its COCO test will skip"; fi

run: install $(FMNIST)
	$(VENV)/bin/a2mim prepare fashion-mnist --out $(RESULTS)/data/fashion-mnist-tiny \
	  --train-per-class 200 --val-per-class 50
	$(VENV)/bin/a2mim pretrain --config tiny --out $(RUNS)/pretrain_a2mim $(TINY_DATA)
	$(VENV)/bin/a2mim pretrain --config tiny --out $(RUNS)/pretrain_simmim $(TINY_DATA) \
	  --set model.preset=simmim_resnet18
	$(VENV)/bin/a2mim finetune --config tiny --out $(RUNS)/finetune_scratch $(TINY_DATA)
	for m in a2mim simmim; do \
	  $(VENV)/bin/a2mim finetune --config tiny --out $(RUNS)/finetune_$$m $(TINY_DATA) \
	    --init $(RUNS)/pretrain_$$m/encoder.pt || exit 1; \
	  $(VENV)/bin/a2mim linprobe --config tiny --out $(RUNS)/linprobe_$$m $(TINY_DATA) \
	    --init $(RUNS)/pretrain_$$m/encoder.pt || exit 1; \
	done
	@$(PY) -c "import json,sys; [print(f'{r:18s} top1={json.load(open(f\"$(RUNS)/{r}/metrics.json\"))[\"top1\"]:.2f}') for r in sys.argv[1:]]" \
	  finetune_scratch finetune_simmim finetune_a2mim linprobe_simmim linprobe_a2mim
	@echo "figures: $$(ls $(RUNS)/pretrain_*/figures/*.png | tr '\n' ' ')"

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

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
