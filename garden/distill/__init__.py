"""Level 3: one machine's distillation, with no network. Never imports ``garden.inference``.

Shaking (sampling the teacher and judging its answers) makes DORPO rows; training on them makes a student.

- ``shaker``: sample the teacher in batches, judge the candidates, record its top-k log-probs
- ``teachers``: several teachers in order of preference, the first that loads and answers is used
- ``judges``: turn a prompt's candidates into a chosen/rejected pair (reference, regex, JSON schema,
  a teacher as grader); :func:`garden.distill.judges.build_judge` is the one place judges are built
- ``judge_sandbox``: a mission's regex and JSON schema judges in a child process, with time and memory limits
- ``dorpo``: the DORPO loss (NLL + odds-ratio + top-k KL to the teacher)
- ``collate``: rows to the tensors the loss needs
- ``trainer``: the single-machine DORPO trainer (AdamW, schedule, accumulation, exact resume)
- ``on_policy``: the student's own sampled answers as the rejected ones (ORPO-Distill's negatives)
- ``runs``: start or resume a training run from a student spec and rows
- ``checkpoints``: training run directories and their checkpoints (atomic, sha256-verified)
- ``evaluate``: held-out KL to the teacher, NLL, preference accuracy, top-1 agreement
"""
