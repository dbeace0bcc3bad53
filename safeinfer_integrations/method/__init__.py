"""SafeInfer's method, as value objects and pure functions: the safety vector and its harm gate, the
steering hook (Safety Amplification), the guidance formula (safety-guided decoding), the refusal rule,
and the shipped assets. Imports nothing from training, evaluation, the command line or the adapters."""
