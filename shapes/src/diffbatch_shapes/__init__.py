"""The embedded shapes model's own tools, kept out of the inference package: the procedural data set, the
tokenizer and the training command (``training``), and the deterministic analyser with ``diffbatch
eval-shapes`` (``evaluation``). A separate distribution (``diffbatch-shapes``, this folder's pyproject);
its trained weights ship as package data of ``diffbatch`` itself (``diffbatch.models``)."""
