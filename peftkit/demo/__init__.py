"""The main job: five customers, one base, five adapters, one server."""

from peftkit.demo.run import DemoConfig, run_demo

__all__ = ["DemoConfig", "run_demo"]
