#!/usr/bin/env bash
# Placeholder replaced by the data-pipeline work: builds lmplz/build_binary into tools/kenlm/bin.
exit 0
