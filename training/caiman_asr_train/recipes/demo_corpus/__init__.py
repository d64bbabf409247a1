"""The built-in demo's speech corpus: grammar (``grammar`` + lexicon.json and
patterns.json), voices (``espeak``) and the corpus on disk (``corpus``)."""
