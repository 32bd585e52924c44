"""Sandboxed execution of generated programs."""

from anchorcoder.execution.sandbox import ExecutionResult, SandboxLimits, run_program, run_programs, sandbox_layers

__all__ = ["ExecutionResult", "SandboxLimits", "run_program", "run_programs", "sandbox_layers"]
