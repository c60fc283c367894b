# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test install clean benchmark

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test,plot,tensorboard]'
	@touch $(STAMP)

install: $(STAMP)

# The main job on the built-in synthetic dataset, sized for a 2-core CPU (a few minutes):
# measure and choose, train with exactly that choice, then show the recommendation again.
# The tuner's default objective (goodput: noise scale measured, adascale learning rate)
# and its default stop past the goodput peak keep the search to a handful of trials.
DEMO_MODEL := --image-size 32 --message-bits 8 --channels 16 --noise "jpeg()+dropout(0.5,0.6)"
demo: $(STAMP)
	$(VENV)/bin/arwgan-autotune $(DEMO_MODEL) --target-mem 3GB --max-batch 128 --max-trials 8 \
		--trial-budget 20 --compare-steps 8 --out $(DEMO_OUT)/tuned.json --plot $(DEMO_OUT)/trials.png
	$(VENV)/bin/arwgan-train --from-tuned $(DEMO_OUT)/tuned.json --epochs 2 --steps-per-epoch 40 \
		--val-images 128 --out $(DEMO_OUT)/train --overwrite
	$(VENV)/bin/arwgan-autotune --show $(DEMO_OUT)/tuned.json

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
