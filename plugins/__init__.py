"""NexGate's built-in plugins. Each is an ordinary pluggy plugin, listed in
``nexgate_proxy.plugins.DEFAULT_PLUGINS`` and disabled by name in the config."""
