"""The commands of ``bmrs``, one module each: ``add_parser(commands, parents)`` declares its
options (``parents``: the shared ``--threads`` and ``--no-progress`` parsers) and sets
``run(args) -> exit status`` as what it calls; :mod:`bmrs.cli` lists them and dispatches."""
