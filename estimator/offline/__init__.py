"""The offline pipeline: label, train, evaluate, compare, replay (and fit the stopping table).

Nothing here runs while serving. These modules build what the server loads (the T2 head, its
stopping table) and measure it, so they import the online pieces they fit and replay
(estimator.policies, estimator.policy_spec, estimator.head, estimator.learned_stopping), and
reach the server's own engine path and rules only through `engine_runs`. The other way round
never happens: online code (estimator/*.py, server/*) does not import estimator.offline,
except the `t2serve label/train/evaluate` handlers in server/cli/research.py, lazily inside
the handler (tests/estimator/test_boundary.py).

  engine_runs   the one crossing into server/
  inputs/       what label reads      labels/      A_x(N), N*, `label`
  training/     `train`               evaluation/  `evaluate`
"""
