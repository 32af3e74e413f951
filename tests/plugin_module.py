"""A plugin loaded by module name from the config's `plugins.modules` (used by test_hooks)."""

from nexgate_proxy import hookimpl


@hookimpl
def nexgate_admit(ctx):
    ctx.response_headers["x-module-plugin"] = "yes"
