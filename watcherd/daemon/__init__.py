"""The daemon itself: the main loop that ties the stages together, and systemd notification."""
