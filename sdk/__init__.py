"""mabeam: a multi-agent coordination mesh."""
