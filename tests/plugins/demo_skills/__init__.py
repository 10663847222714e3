"""A small skill package outside cycleqd, as a user would write one (see docs/tasks.md).

``demo_skills.skills:ShellText`` derives from cycleqd's Task; ``demo_skills.duck:Upper`` only has
the protocol's shape. ``demo_skills-0.1.dist-info`` beside it registers ``shell_text`` under the
entry-point group ``cycleqd.tasks``, as ``pip install`` of a package that declares it would.
"""
