// Seed-style push server on Go with gorilla/websocket: one process, library defaults.
// Upgrades on any path, sends the time in ms to every client every interval, answers
// pings (gorilla's default ping handler). Usage: go-gorilla -port N -interval 1s
package main

import (
	"flag"
	"fmt"
	"net/http"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/gorilla/websocket"
)

var (
	upgrader = websocket.Upgrader{CheckOrigin: func(*http.Request) bool { return true }}
	mu       sync.Mutex
	clients  = map[*websocket.Conn]struct{}{}
)

func serve(w http.ResponseWriter, r *http.Request) {
	conn, err := upgrader.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	mu.Lock()
	clients[conn] = struct{}{}
	mu.Unlock()
	// Reading runs the ping handler; an error (close, EOF) ends the connection.
	go func() {
		for {
			if _, _, err := conn.ReadMessage(); err != nil {
				break
			}
		}
		mu.Lock()
		delete(clients, conn)
		mu.Unlock()
		conn.Close()
	}()
}

func main() {
	port := flag.Int("port", 8080, "port to listen on (127.0.0.1)")
	interval := flag.Duration("interval", time.Second, "time between two pushes")
	flag.Parse()
	go func() {
		for range time.Tick(*interval) {
			now := []byte(strconv.FormatInt(time.Now().UnixMilli(), 10))
			mu.Lock()
			for conn := range clients {
				conn.WriteMessage(websocket.TextMessage, now)
			}
			mu.Unlock()
		}
	}()
	addr := fmt.Sprintf("127.0.0.1:%d", *port)
	fmt.Println("listening on " + addr)
	if err := http.ListenAndServe(addr, http.HandlerFunc(serve)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
