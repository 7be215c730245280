"""The DeepSeek-R1 recipe at toy scale, on top of the trainer.

Modules: ``toy`` (the demo's addition task and character tokenizer), ``world`` (the R1 toy world: traces
in two languages, the pretraining corpus, cold-start data), ``simple`` (the non-reasoning task family),
``language`` (language consistency), ``rejection`` (rejection sampling and the SFT-set mix), ``config``
(the pipeline's stages and rounds), ``pipeline`` (``grpo-fast pipeline``), ``report`` (tables, effects,
plots), ``demo`` (``grpo-fast demo``).
"""
