# Two commands on a fresh machine: `make train` and `make test`. Both build .venv on
# first use; a stamp keyed on what was asked for skips the install next time.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
APT_PKGS := pkg-config libopencv-dev libturbojpeg0-dev
STAMP := $(VENV)/.installed-$(shell cat setup.py Makefile | sha1sum | cut -c1-12)
TRAIN_ARGS ?=

.PHONY: install train test bench clean

install: $(STAMP)

$(STAMP):
	@if ! pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then \
	  echo "[install] apt: $(APT_PKGS)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_PKGS) >/dev/null; \
	fi
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q "numpy<2.5" cython pkgconfig
	$(PY) -m pip install -q --no-build-isolation -e '.[dali,ffcv,export,test]'
	@rm -f $(VENV)/.installed-*; touch $@

train: install
	$(PY) -m engine.train --preset cpu-demo --loader dali --budget 4m30s $(TRAIN_ARGS)

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m benchmarks.throughput

clean:
	rm -rf $(VENV) runs .cache
