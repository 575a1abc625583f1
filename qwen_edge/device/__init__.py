"""What the device is and what its native engines may do: target profiles (packaged and user YAML, found through
datafiles), the host CPU report, llama.cpp loading and its extra-buffer policy."""
