# Two commands do everything on a fresh machine: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
KERNEL := resnet-lab
PRESET ?= quick

# Offline machines: use the shared JPEG copy of CIFAR-10 unless RESNET_LAB_DATA says otherwise.
# (paths through the shell and "$(CURDIR)/...", not make's abspath or wildcard, which split a path at its spaces)
SHARED_DATA := $(shell cd .. && pwd)/shared/data/cifar10-jpeg.tar.gz
ifeq ($(strip $(RESNET_LAB_DATA)),)
ifneq ($(shell test -f "$(SHARED_DATA)" && echo yes),)
export RESNET_LAB_DATA := $(SHARED_DATA)
endif
endif

# A relative RESNET_LAB_* path names a place under the folder make runs in; kernels (JupyterLab's, papermill's)
# start in notebooks/, where it would name nothing: pass them on absolute (from the environment or `make V=...`).
$(foreach v,RESNET_LAB_DATA RESNET_LAB_DATA_DIR RESNET_LAB_RESULTS,$(if $(strip $($(v))),$(if $(filter /%,$(firstword $($(v)))),,$(eval override $(v) := $(CURDIR)/$($(v))))$(eval export $(v))))

PAPERMILL := $(BIN)/papermill -k $(KERNEL) --log-level WARNING
# the committed tables and figures: a notebook executed here writes into results/<preset>/<notebook>/ (one run by
# hand, in JupyterLab or papermill, into the git-ignored results/<preset>/scratch/<notebook>/ instead)
TABLES := $(or $(RESNET_LAB_RESULTS),$(CURDIR)/results)/$(PRESET)
OUT    := $(TABLES)/executed

.PHONY: install test reproduce figures lab clean-venv gpu-in gpu-back gpu-relay

install: $(VENV)/.installed

# pip takes torch/torchvision from the local wheels (constraints.txt pins what the tests ran with).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (resnet-lab)" >/dev/null
	touch $@

test: install
	$(BIN)/python -m pytest -q

# The quick preset keeps `make reproduce` near 15 minutes on 2 CPU cores (1031 s on a 2-core EPYC; 2208 s on a 2-core Xeon, 1406 s on another with the install),
# with other grids than the notebooks' defaults (which are the paper's): fewer depths and variants, and
# 3 seeds for 01 and 06 (the default is one; 01's claims are judged against seed noise). Notebooks
# share runs through the store (06 reuses 01's nets, 05 compares the 1202-layer net with 01's
# ResNet-56 instead of training a 110).
ifeq ($(PRESET),quick)
ARGS_01 := -y 'seeds: [0, 1, 2]'
ARGS_02 := -y 'depths: [20, 32, 44, 56]'
ARGS_03 := -y 'depths: [20]'
ARGS_04 := -p depth 20 -p draws 3 -p eval_images 1000 -p grad_samples 4
ARGS_05 := -y 'depths: [56, 1202]'
ARGS_06 := -p max_images 2000 -y 'seeds: [0, 1, 2]'
ARGS_07 := -p batch_size 2 -p repeats 1
ARGS_08 :=
endif

# Executes every notebook through papermill with the $(PRESET) preset; finished runs are reused.
reproduce: install
	mkdir -p "$(OUT)"
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/01_degradation" $(PAPERMILL) notebooks/01_degradation.ipynb "$(OUT)/01_degradation.ipynb" -p preset $(PRESET) $(ARGS_01)
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/02_depth" $(PAPERMILL) notebooks/02_depth.ipynb "$(OUT)/02_depth.ipynb" -p preset $(PRESET) $(ARGS_02)
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/03_shortcut_ablations" $(PAPERMILL) notebooks/03_shortcut_ablations.ipynb "$(OUT)/03_shortcut_ablations.ipynb" -p preset $(PRESET) $(ARGS_03)
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/04_unraveled_ensemble" $(PAPERMILL) notebooks/04_unraveled_ensemble.ipynb "$(OUT)/04_unraveled_ensemble.ipynb" -p preset $(PRESET) $(ARGS_04)
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/05_thousand_layers" $(PAPERMILL) notebooks/05_thousand_layers.ipynb "$(OUT)/05_thousand_layers.ipynb" -p preset $(PRESET) $(ARGS_05)
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/06_layer_responses" $(PAPERMILL) notebooks/06_layer_responses.ipynb "$(OUT)/06_layer_responses.ipynb" -p preset $(PRESET) $(ARGS_06)
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/07_imagenet_architectures" $(PAPERMILL) notebooks/07_imagenet_architectures.ipynb "$(OUT)/07_imagenet_architectures.ipynb" -p preset $(PRESET) $(ARGS_07)
	RESNET_LAB_OUTPUT_DIR="$(TABLES)/08_fast_path_fidelity" $(PAPERMILL) notebooks/08_fast_path_fidelity.ipynb "$(OUT)/08_fast_path_fidelity.ipynb" -p preset $(PRESET) $(ARGS_08)
	$(BIN)/python -c 'from pathlib import Path; from resnet_lab import claims, page, report; report.stamp("$(PRESET)", Path("$(OUT)")); claims.check("$(PRESET)"); page.write_page("$(PRESET)")'
	@cat "$(TABLES)/claims.md"
	@echo "tables and figures under $(TABLES)/, all on one page: $(TABLES)/RESULTS.md"

# Tables and figures of every notebook rebuilt from results/runs/ without training.
figures: install
	$(BIN)/resnet-lab report --preset $(PRESET)

lab: install
	$(BIN)/jupyter lab notebooks/

# A GPU session (README, "Running on a GPU"): `make gpu-in` writes what the device call carries (.data and
# .gpu-in: with the repository, within the tool's 64 MiB), `bash .ci/gpu-session` runs there, and
# `make gpu-back FROM=<the folder(s) the calls' files came back to>` takes them in here (`make gpu-relay
# FROM=...` between two calls when the machine went back in between).
# The unfinished runs go in what the 64 MiB a call carries leaves after the tree and the dataset (2 MiB spare);
# in what they leave, finished runs of ANALYSE_GRIDS without their cached analyses (weights and all: the
# call's analyse stage computes them in minutes, where this CPU takes hours).
ANALYSE_GRIDS ?= sweeps/unraveled_ensemble.yaml
RESULTS_ROOT := $(or $(RESNET_LAB_RESULTS),$(CURDIR)/results)
PAPER_RECORDS := $(RESULTS_ROOT)/paper/runs
gpu-in: install
	@test -f "$(RESNET_LAB_DATA)" || { echo "set RESNET_LAB_DATA to a CIFAR-10 archive or tarball"; exit 2; }
	mkdir -p .data .gpu-in
	rm -f .gpu-in/resume.tar.gz.* .gpu-in/analyse.tar.gz.*
	src="$$(realpath "$(RESNET_LAB_DATA)")"; dst="$$(realpath -m ".data/$$(basename "$$src")")"; \
	if [ "$$src" != "$$dst" ]; then find .data -maxdepth 1 -type f -delete && cp "$$src" .data/.copy.tmp && \
	  mv .data/.copy.tmp "$$dst"; fi
# the committed paper records, where there are any
	test -z "$$(ls -A "$(PAPER_RECORDS)" 2>/dev/null)" || $(BIN)/resnet-lab runs import "$(PAPER_RECORDS)"
	$(BIN)/resnet-lab runs manifest .gpu-in/have.json
	mb=$$($(BIN)/python -c 'import os, subprocess as sp; \
	  tree = sum(os.path.getsize(p) for p in sp.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], \
	             capture_output=True, check=True).stdout.decode().split("\0") if p and os.path.isfile(p)); \
	  data = sum(e.stat().st_size for e in os.scandir(".data") if e.is_file()); \
	  print(int((64 * 2**20 - tree - data) / 2**20) - 2)'); \
	if [ "$$mb" -lt 1 ]; then echo "the tree and .data leave no room under 64 MiB for unfinished runs"; exit 2; fi; \
	echo "unfinished runs: up to $$mb MiB"; echo "$$mb" > .gpu-in/carry-mb; \
	$(BIN)/resnet-lab runs export .gpu-in --name resume --checkpoints --unfinished --max-mb $$mb || exit $$?; \
	left=$$($(BIN)/python -c 'import glob, os, sys; \
	  print(int(int(sys.argv[1]) - sum(os.path.getsize(p) for p in glob.glob(".gpu-in/resume.tar.gz.*")) / 2**20))' $$mb) \
	  || exit $$?; \
	if [ -z "$(ANALYSE_GRIDS)" ]; then :; elif [ "$$left" -lt 1 ]; then echo "no room left to send runs to analyse"; \
	else echo "runs to analyse: up to $$left MiB"; \
	  $(BIN)/resnet-lab runs export .gpu-in --name analyse $(foreach g,$(ANALYSE_GRIDS),--to-analyse $(g)) \
	    --max-mb $$left || { rc=$$?; [ $$rc -eq 1 ] || exit $$rc; \
	    echo "(runs larger than the room left wait for a session whose unfinished runs leave more)"; }; fi
	@du -sh .data .gpu-in

# FROM: one or more folders a device call's files came back to, in the order of the calls
import-from = @test -n "$(FROM)" || { echo "usage: make $@ FROM='<the folder(s) the device calls' files came back to>'"; exit 2; }; \
	for d in $(FROM); do test -d "$$d" || { echo "FROM: $$d is not a folder"; exit 2; }; done; \
	for d in $(FROM); do parts="$$(ls "$$d"/runs.tar.gz.[0-9]* 2>/dev/null)"; \
	  [ -z "$$parts" ] || $(BIN)/resnet-lab runs import $$parts || exit $$?; done

# the bench's files and the GPU tests' outcomes (<device>-tests.json: a later call skips tests that ran on its sources)
copy-bench = mkdir -p "$(RESULTS_ROOT)/bench"; \
	for d in $(FROM); do for f in "$$d"/*.json "$$d"/*.md "$$d"/*-profile.txt; do \
	  [ ! -e "$$f" ] || cp "$$f" "$(RESULTS_ROOT)/bench/"; done; done

gpu-back: install
	$(import-from)
	$(copy-bench)
	$(BIN)/resnet-lab report --preset paper
	@echo "bench files (and the GPU tests' outcomes, <device>-tests.json) copied to $(RESULTS_ROOT)/bench/; add a call's log.txt there as <device>-<date>-session-log.txt if useful"

# Between two device calls when the machine has gone back (cold): the first call's runs into this store, then
# what the next call carries (its store starts empty, so it resumes only what .gpu-in sends)
gpu-relay: install
	$(import-from)
	$(copy-bench)
	$(MAKE) gpu-in

clean-venv:
	rm -rf $(VENV)
