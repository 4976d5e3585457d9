"""Labels: A_x(N), N*, sample types (targets) and `t2serve label` (labeling), resumable shards."""
