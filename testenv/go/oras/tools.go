//go:build tools

// Pins the oras CLI's Go module for testenv/build.sh.
package tools

import _ "oras.land/oras/cmd/oras"
