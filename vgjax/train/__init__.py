"""Training: one engine (loop.py) shared by every method.

  state.py       TrainState, the trainable/frozen split, optimizers, the one update
  loop.py        set-up, resume, the asynchronous step loop, validation, patience, the test
  checkpoint.py  orbax checkpoints in step-named folders; last and best in one commit
  losses.py      triplet, SARE, CosFace
  mining.py      the benchmark's triplet mining (pure functions)
  triplet.py     the benchmark's triplet training (a loop.Method)
  cosplace.py    CosPlace's CosFace training over groups of classes (a loop.Method)
"""
