"""Natural instabilities: does a defense help a run that goes bad on its own?

No fault is injected. Each workload family is one file (``adam_spikes``, ``rnn``,
``post_ln``, ``fp16``); ``runner`` trains one optimizer on one workload for all seeds in a
single compiled program (``scan`` over steps, ``vmap`` over seeds); ``metrics`` turns a
loss curve into spike episodes, late and final loss and failure; ``optimizers`` lists the
optax baselines, adaptx's recipes and transforms and the mechanisms under test
(``mechanisms``); ``goal`` checks one candidate against the baselines; ``report`` writes
``bench/measured/natural.md`` and ``.json``; ``sweep`` is the command line.
"""
