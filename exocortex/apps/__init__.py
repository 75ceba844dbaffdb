"""What people use a trained run with: chat in the terminal, the OpenAI-compatible server, exports."""
