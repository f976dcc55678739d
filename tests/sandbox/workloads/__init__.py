"""Programs that run as the sandbox's pods: a leaky app and a well-behaved one."""
