"""The optimizer-step benchmark (``bench/update_step.py``), one concept a module.

* :mod:`~bench.update.config`: hyperparameters, pipelines, implementations, bytes per step;
* :mod:`~bench.update.trees`: the parameter trees (shapes, names, random contents);
* :mod:`~bench.update.pipelines`: each pipeline as a JAX step (optax, adaptx, hand-written);
* :mod:`~bench.update.variants`: a JAX step (and the bandwidth ceiling) ready to run;
* :mod:`~bench.update.external`: the PyTorch and C steps;
* :mod:`~bench.update.timing`: compile events, interleaved rounds, paired ratios, ceiling;
* :mod:`~bench.update.compiled`: what XLA compiled (kernels, HLO passes, static memory);
* :mod:`~bench.update.memory`: the process RSS and the device allocator's peak;
* :mod:`~bench.update.donation`: buffers that cannot be donated, the donation notice;
* :mod:`~bench.update.cell`: one (tree, pipeline) cell, measured;
* :mod:`~bench.update.run`: every cell of every tree, partial results on the way;
* :mod:`~bench.update.metadata`: machine, versions, commit, load;
* :mod:`~bench.update.targets`: the speed and memory targets;
* :mod:`~bench.update.merge`: several result files as one;
* :mod:`~bench.update.report`: the console lines, the Markdown, the files written;
* :mod:`~bench.update.cli`: the command line.
"""
