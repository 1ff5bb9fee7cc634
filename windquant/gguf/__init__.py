"""GGUF output: one llama.cpp tensor type per block linear, chosen by the exact knapsack on our
sensitivity costs under a bits-per-weight target (``windquant gguf``).

* :mod:`.types`: the tensor types, their real sizes (one table, read by the recipe's accounting
  and checked against the written file), which fit a row width;
* :mod:`.files`: reading a source GGUF, writing GGUFs (metadata copied) and llama.cpp's imatrix;
* :mod:`.llamacpp`: the llama.cpp tools built by ``make llamacpp`` (optional);
* :mod:`.recipe`: the candidates' costs and the knapsack that makes a recipe;
* :mod:`.build`: the pipeline the CLI runs.
"""
