# Two commands do everything on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
KERNEL := resnet-lab
PRESET ?= quick
OUT    := results/$(PRESET)/executed

# Offline machines: use the shared JPEG copy of CIFAR-10 unless RESNET_LAB_DATA says otherwise.
SHARED_DATA := $(abspath ../shared/data/cifar10-jpeg.tar.gz)
ifeq ($(strip $(RESNET_LAB_DATA)),)
ifneq ($(wildcard $(SHARED_DATA)),)
export RESNET_LAB_DATA := $(SHARED_DATA)
endif
endif

PAPERMILL := $(BIN)/papermill -k $(KERNEL) --log-level WARNING

.PHONY: install test reproduce figures lab clean-venv

install: $(VENV)/.installed

# pip takes torch/torchvision from the local wheels (constraints.txt pins what the tests ran with).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (resnet-lab)" >/dev/null
	touch $@

test: install
	$(BIN)/python -m pytest -q

# Executes every notebook through papermill with the $(PRESET) preset; finished runs are reused.
reproduce: install
	mkdir -p $(OUT)
	$(PAPERMILL) notebooks/01_degradation.ipynb $(OUT)/01_degradation.ipynb -p preset $(PRESET)
	@echo "tables and figures under results/$(PRESET)/"

lab: install
	$(BIN)/jupyter lab notebooks/

clean-venv:
	rm -rf $(VENV)
