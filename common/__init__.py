"""The ground floor: plain helpers with no heavy imports, used by every other package."""
