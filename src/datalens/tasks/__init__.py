"""Layer 1: tasks. A task says how a model of one kind is trained and what output of it is attributed
(:class:`datalens.tasks.base.Task`); classification is one."""
