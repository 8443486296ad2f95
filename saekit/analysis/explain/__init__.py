"""Features explained in words: explainers, judges, scorers and the on-disk prompt cache.

`protocol` holds the shared types (a feature's examples, an explanation, its ledger entry) and the
example sampling across activation intervals; `ngram` the offline contrastive explainer (the
default); `openai` and `local` the chat backends (an OpenAI-compatible endpoint, a local Hugging
Face causal LM); `llm` the prompts that turn a chat backend into an explainer and a judge; `cache`
the content-hash cache every chat backend goes through; `scorers` detection, fuzzing and the
LLM-free embedding scorer; `runner` streams a bundle's feature records through all of it.
"""
