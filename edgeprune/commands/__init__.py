"""One module per ``edgeprune`` subcommand.

Each module defines ``register(subparsers)`` which adds its parser and sets ``func`` to a
callable taking the parsed namespace and returning an exit code. Heavy imports (torch,
flask) happen inside the command, so ``edgeprune --help`` stays fast.
"""
