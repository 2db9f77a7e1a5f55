# Set-up is idempotent: `make run` and `make test` both create .venv, install the project and the data.
VENV   ?= .venv
BIN    := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export DVC_NO_ANALYTICS := 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup data run test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[cpu,test]'
	touch $@

# Fashion-MNIST from Debian where apt and root are there; otherwise `kd prepare` downloads it with torchvision.
data:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		 (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null)) || \
		echo "dataset-fashion-mnist not installed: kd prepare will download Fashion-MNIST"; \
	fi

run: setup data
	dvc repro
	@echo
	cat reports/summary.md

test: setup data
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest

clean:
	rm -rf data/prepared models metrics dvclive .kd-resume
