"""Training: losses, optimizers (two-speed rates), the jitted train step, and few-shot adaptation of many
(task, seed) pairs as one vmapped program."""
