"""What every room shares: errors, configs, bundled resources, box maths, output locks,
progress bars and the process's allocator settings. Imports nothing else of querydet_cli."""
