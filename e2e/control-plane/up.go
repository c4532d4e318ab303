package main

// The launcher: certificates, kubeconfigs, embedded etcd, then the three components as child
// processes of this binary; ready when the API server is ready and both the controller manager
// and the scheduler hold their leader leases; everything stopped and removed on SIGTERM/SIGINT
// or when any component exits.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"encoding/json"

	"go.etcd.io/etcd/server/v3/embed"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"k8s.io/component-base/version"
)

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, " ") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

type options struct {
	dir                    string
	kubeconfig             string
	port                   int
	nodeMonitorPeriod      time.Duration
	nodeMonitorGracePeriod time.Duration
	apiserverArgs          stringList
	controllerManagerArgs  stringList
	schedulerArgs          stringList
	readyTimeout           time.Duration
	nodes                  stringList
	componentLogsToStderr  bool
}

func say(format string, args ...any) {
	fmt.Fprintf(os.Stdout, "control-plane: "+format+"\n", args...)
}

func up(args []string) int {
	var o options
	fs := flag.NewFlagSet("control-plane", flag.ContinueOnError)
	fs.StringVar(&o.dir, "dir", "", "state directory (certificates, kubeconfigs, etcd data, logs); created, and removed on exit (default: a new temporary directory)")
	fs.StringVar(&o.kubeconfig, "kubeconfig", "", "also write the admin kubeconfig here (removed on exit)")
	fs.IntVar(&o.port, "port", 0, "the API server's port on 127.0.0.1 (0: a free one)")
	fs.DurationVar(&o.nodeMonitorPeriod, "node-monitor-period", 5*time.Second, "kube-controller-manager --node-monitor-period")
	fs.DurationVar(&o.nodeMonitorGracePeriod, "node-monitor-grace-period", 50*time.Second, "kube-controller-manager --node-monitor-grace-period: how long a node's lease may go unrenewed before it is Unknown")
	fs.Var(&o.apiserverArgs, "apiserver-arg", "an extra kube-apiserver flag (repeatable)")
	fs.Var(&o.controllerManagerArgs, "controller-manager-arg", "an extra kube-controller-manager flag (repeatable)")
	fs.Var(&o.schedulerArgs, "scheduler-arg", "an extra kube-scheduler flag (repeatable)")
	fs.DurationVar(&o.readyTimeout, "ready-timeout", 2*time.Minute, "give up when not ready in this long")
	fs.Var(&o.nodes, "node", "register an ordinary node of this name (zone e2e-a, tainted NoSchedule so nothing lands on it) and keep it Ready, as its kubelet would (repeatable): a cluster whose only nodes are virtual ones is, to the node lifecycle controller, a control plane cut off from every node, and it evicts nothing")
	fs.BoolVar(&o.componentLogsToStderr, "v", false, "copy the components' logs to stderr (they are always in <dir>/logs)")
	showVersion := fs.Bool("version", false, "print the Kubernetes version and exit")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if *showVersion {
		fmt.Printf("Kubernetes %s\n", version.Get().GitVersion)
		return 0
	}
	cp, err := start(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "control-plane: %v\n", err)
		if cp != nil {
			cp.printLogTails()
			cp.stop()
		}
		return 1
	}
	signals := make(chan os.Signal, 2)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT)
	code := 0
	select {
	case s := <-signals:
		say("%v: stopping", s)
	case name := <-cp.exited:
		fmt.Fprintf(os.Stderr, "control-plane: %s exited; stopping the others\n", name)
		cp.printLogTails()
		code = 1
	case err := <-cp.etcd.Err():
		fmt.Fprintf(os.Stderr, "control-plane: etcd failed: %v; stopping\n", err)
		code = 1
	}
	cp.stop()
	say("stopped, %s removed", cp.dir)
	return code
}

// keepNodeReady registers an ordinary node and heartbeats it (its Lease and its Ready
// condition) until the launcher stops.
func (cp *controlPlane) keepNodeReady(p *pki, server, name string) error {
	client, err := adminClient(p, server)
	if err != nil {
		return err
	}
	ctx := context.Background()
	node := &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"kubernetes.io/hostname":      name,
			"topology.kubernetes.io/zone": "e2e-a",
		}},
		Spec: corev1.NodeSpec{Taints: []corev1.Taint{{Key: "e2e.ec2-kubelet.io/no-kubelet", Effect: corev1.TaintEffectNoSchedule}}},
	}
	if _, err := client.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
		return err
	}
	heartbeat := func() error {
		now := metav1.Now()
		status := corev1.NodeStatus{Conditions: []corev1.NodeCondition{{
			Type: corev1.NodeReady, Status: corev1.ConditionTrue, Reason: "KubeletReady",
			Message: "heartbeated by the e2e control plane", LastHeartbeatTime: now, LastTransitionTime: now,
		}}}
		patch, err := json.Marshal(map[string]any{"status": status})
		if err != nil {
			return err
		}
		if _, err := client.CoreV1().Nodes().Patch(ctx, name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
			return err
		}
		leases := client.CoordinationV1().Leases("kube-node-lease")
		micro := metav1.NewMicroTime(time.Now())
		lease, err := leases.Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			seconds := int32(40)
			lease = &coordinationv1.Lease{
				ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec:       coordinationv1.LeaseSpec{HolderIdentity: &name, LeaseDurationSeconds: &seconds, RenewTime: &micro},
			}
			_, err = leases.Create(ctx, lease, metav1.CreateOptions{})
			return err
		}
		lease.Spec.RenewTime = &micro
		_, err = leases.Update(ctx, lease, metav1.UpdateOptions{})
		return err
	}
	if err := heartbeat(); err != nil {
		return err
	}
	go func() {
		for range time.Tick(5 * time.Second) {
			if err := heartbeat(); err != nil {
				fmt.Fprintf(os.Stderr, "control-plane: heartbeat of node %s: %v\n", name, err)
			}
		}
	}()
	return nil
}

type child struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{}
}

type controlPlane struct {
	dir        string
	kubeconfig string
	etcd       *embed.Etcd
	children   []*child
	exited     chan string
}

// freePort returns a loopback port that was free a moment ago (callers retry on a collision).
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func start(o options) (*controlPlane, error) {
	begun := time.Now()
	if o.dir == "" {
		dir, err := os.MkdirTemp("", "ec2-kubelet-control-plane-")
		if err != nil {
			return nil, err
		}
		o.dir = dir
	} else if err := os.MkdirAll(o.dir, 0o700); err != nil {
		return nil, err
	}
	cp := &controlPlane{dir: o.dir, kubeconfig: o.kubeconfig, exited: make(chan string, 4)}
	if err := os.MkdirAll(filepath.Join(o.dir, "logs"), 0o755); err != nil {
		return cp, err
	}
	p, err := writePKI(filepath.Join(o.dir, "pki"))
	if err != nil {
		return cp, fmt.Errorf("certificates: %w", err)
	}
	etcd, etcdURL, err := startEtcd(o.dir)
	if err != nil {
		return cp, fmt.Errorf("etcd: %w", err)
	}
	cp.etcd = etcd

	var server string
	for attempt := 0; ; attempt++ {
		port := o.port
		if port == 0 {
			if port, err = freePort(); err != nil {
				return cp, err
			}
		}
		server = "https://127.0.0.1:" + strconv.Itoa(port)
		apiserver := cp.spawn("kube-apiserver", apiserverArgs(o, p, etcdURL, port), o.componentLogsToStderr)
		err = waitAPIServer(p, server, apiserver, o.readyTimeout)
		if err == nil {
			break
		}
		if o.port == 0 && attempt < 3 && apiserver.logContains("address already in use") {
			cp.children = cp.children[:0]
			continue
		}
		return cp, err
	}
	for _, id := range []string{"admin", "controller-manager", "scheduler"} {
		if err := writeKubeconfig(p, server, id, filepath.Join(o.dir, id+".kubeconfig")); err != nil {
			return cp, err
		}
	}
	if o.kubeconfig != "" {
		if err := os.MkdirAll(filepath.Dir(o.kubeconfig), 0o755); err != nil {
			return cp, err
		}
		if err := writeKubeconfig(p, server, "admin", o.kubeconfig); err != nil {
			return cp, err
		}
	} else {
		cp.kubeconfig = filepath.Join(o.dir, "admin.kubeconfig")
	}
	cp.spawn("kube-controller-manager", controllerManagerArgs(o, p), o.componentLogsToStderr)
	cp.spawn("kube-scheduler", schedulerArgs(o), o.componentLogsToStderr)
	if err := cp.waitControllers(p, server, o.readyTimeout); err != nil {
		return cp, err
	}
	for _, name := range o.nodes {
		if err := cp.keepNodeReady(p, server, name); err != nil {
			return cp, fmt.Errorf("node %s: %w", name, err)
		}
	}
	say("ready in %.1fs: Kubernetes %s at %s, kubeconfig %s", time.Since(begun).Seconds(), version.Get().GitVersion, server, cp.kubeconfig)
	return cp, nil
}

func startEtcd(dir string) (*embed.Etcd, string, error) {
	var lastErr error
	for attempt := 0; attempt < 5; attempt++ {
		clientPort, err := freePort()
		if err != nil {
			return nil, "", err
		}
		peerPort, err := freePort()
		if err != nil {
			return nil, "", err
		}
		cfg := embed.NewConfig()
		cfg.Name = "e2e"
		cfg.Dir = filepath.Join(dir, "etcd")
		cfg.UnsafeNoFsync = true
		cfg.Logger = "zap"
		cfg.LogLevel = "warn"
		cfg.LogOutputs = []string{filepath.Join(dir, "logs", "etcd.log")}
		client := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(clientPort)}
		peer := url.URL{Scheme: "http", Host: "127.0.0.1:" + strconv.Itoa(peerPort)}
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{client}, []url.URL{client}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{peer}, []url.URL{peer}
		cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
		etcd, err := embed.StartEtcd(cfg)
		if err != nil {
			lastErr = err
			os.RemoveAll(cfg.Dir)
			continue
		}
		select {
		case <-etcd.Server.ReadyNotify():
			return etcd, client.String(), nil
		case <-time.After(60 * time.Second):
			etcd.Close()
			return nil, "", errors.New("not ready in 60 s")
		}
	}
	return nil, "", lastErr
}

func apiserverArgs(o options, p *pki, etcdURL string, port int) []string {
	issuer := "https://kubernetes.default.svc.cluster.local"
	args := []string{
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		// Endpoints may not hold loopback addresses: the kubernetes Service gets none (nothing
		// in the cluster dials it; clients use the kubeconfig's address).
		"--endpoint-reconciler-type=none",
		"--secure-port=" + strconv.Itoa(port),
		"--cert-dir=" + filepath.Join(o.dir, "apiserver"),
		"--etcd-servers=" + etcdURL,
		"--tls-cert-file=" + p.path("apiserver.crt"),
		"--tls-private-key-file=" + p.path("apiserver.key"),
		"--client-ca-file=" + p.path("ca.crt"),
		"--authorization-mode=Node,RBAC",
		"--enable-admission-plugins=NodeRestriction",
		"--allow-privileged=true",
		"--service-cluster-ip-range=10.0.0.0/24",
		"--service-account-issuer=" + issuer,
		"--api-audiences=" + issuer,
		"--service-account-key-file=" + p.path("sa.pub"),
		"--service-account-signing-key-file=" + p.path("sa.key"),
		"--kubelet-client-certificate=" + p.path("apiserver-kubelet-client.crt"),
		"--kubelet-client-key=" + p.path("apiserver-kubelet-client.key"),
		// Virtual nodes publish their ENI address as InternalIP; the Hostname address is the node
		// name, which no DNS resolves.
		"--kubelet-preferred-address-types=InternalIP",
		"--requestheader-client-ca-file=" + p.path("front-proxy-ca.crt"),
		"--requestheader-allowed-names=front-proxy-client",
		"--requestheader-extra-headers-prefix=X-Remote-Extra-",
		"--requestheader-group-headers=X-Remote-Group",
		"--requestheader-username-headers=X-Remote-User",
		"--proxy-client-cert-file=" + p.path("front-proxy-client.crt"),
		"--proxy-client-key-file=" + p.path("front-proxy-client.key"),
		// Aggregated APIs (metrics-server in make e2e) run on the host beside the control plane:
		// their Service is an ExternalName (localhost), which the API server dials when it routes
		// to Services rather than to their endpoints (loopback endpoints are refused).
		"--enable-aggregator-routing=false",
	}
	return append(args, o.apiserverArgs...)
}

// clientComponentArgs are the flags the controller manager and the scheduler share: their
// kubeconfig for everything, and no port of their own.
func clientComponentArgs(o options, name string) []string {
	kubeconfig := filepath.Join(o.dir, name+".kubeconfig")
	return []string{
		"--kubeconfig=" + kubeconfig,
		"--authentication-kubeconfig=" + kubeconfig,
		"--authorization-kubeconfig=" + kubeconfig,
		"--bind-address=127.0.0.1",
		"--secure-port=0",
	}
}

func controllerManagerArgs(o options, p *pki) []string {
	args := append(clientComponentArgs(o, "controller-manager"),
		"--root-ca-file="+p.path("ca.crt"),
		"--service-account-private-key-file="+p.path("sa.key"),
		"--use-service-account-credentials=true",
		"--cluster-signing-cert-file="+p.path("ca.crt"),
		"--cluster-signing-key-file="+p.path("ca.key"),
		"--service-cluster-ip-range=10.0.0.0/24",
		"--controllers=*,bootstrapsigner,tokencleaner",
		"--node-monitor-period="+o.nodeMonitorPeriod.String(),
		"--node-monitor-grace-period="+o.nodeMonitorGracePeriod.String(),
	)
	return append(args, o.controllerManagerArgs...)
}

func schedulerArgs(o options) []string {
	return append(clientComponentArgs(o, "scheduler"), o.schedulerArgs...)
}

func writeKubeconfig(p *pki, server, id, path string) error {
	kp := p.clients[id]
	key, err := keyPEM(kp.key)
	if err != nil {
		return err
	}
	config := clientcmdapi.NewConfig()
	config.Clusters["ec2-kubelet-e2e"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: p.ca.certPEM()}
	config.AuthInfos[id] = &clientcmdapi.AuthInfo{ClientCertificateData: kp.certPEM(), ClientKeyData: key}
	config.Contexts["ec2-kubelet-e2e"] = &clientcmdapi.Context{Cluster: "ec2-kubelet-e2e", AuthInfo: id, Namespace: "default"}
	config.CurrentContext = "ec2-kubelet-e2e"
	return clientcmd.WriteToFile(*config, path)
}

func adminClient(p *pki, server string) (*kubernetes.Clientset, error) {
	kp := p.clients["admin"]
	key, err := keyPEM(kp.key)
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(&rest.Config{
		Host:            server,
		TLSClientConfig: rest.TLSClientConfig{CAData: p.ca.certPEM(), CertData: kp.certPEM(), KeyData: key},
		Timeout:         5 * time.Second,
	})
}

// spawn starts this binary as one component, with its output in <dir>/logs/<name>.log. The
// child is killed if the launcher dies.
func (cp *controlPlane) spawn(name string, args []string, toStderr bool) *child {
	self, err := os.Executable()
	if err != nil {
		self = os.Args[0]
	}
	c := &child{name: name, log: filepath.Join(cp.dir, "logs", name+".log"), done: make(chan struct{})}
	out, err := os.OpenFile(c.log, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		out = nil
	}
	c.cmd = exec.Command(self, append([]string{name}, args...)...)
	c.cmd.Stdout, c.cmd.Stderr = out, out
	if toStderr && out != nil {
		c.cmd.Stderr = teeWriter{out, os.Stderr}
	}
	c.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	cp.children = append(cp.children, c)
	if err := c.cmd.Start(); err != nil {
		close(c.done)
		cp.exited <- name
		return c
	}
	go func() {
		_ = c.cmd.Wait()
		if out != nil {
			out.Close()
		}
		close(c.done)
		cp.exited <- name
	}()
	return c
}

type teeWriter struct{ a, b *os.File }

func (t teeWriter) Write(p []byte) (int, error) {
	n, err := t.a.Write(p)
	_, _ = t.b.Write(p)
	return n, err
}

func (c *child) running() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

func (c *child) logContains(s string) bool {
	data, err := os.ReadFile(c.log)
	return err == nil && strings.Contains(string(data), s)
}

func waitAPIServer(p *pki, server string, apiserver *child, timeout time.Duration) error {
	client, err := adminClient(p, server)
	if err != nil {
		return err
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if !apiserver.running() {
			return errors.New("kube-apiserver exited before it was ready")
		}
		body, err := client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(context.Background())
		if err == nil && string(body) == "ok" {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("kube-apiserver not ready in %v", timeout)
}

// waitControllers waits until the controller manager and the scheduler hold their leader leases
// and the controller manager has created the default service account.
func (cp *controlPlane) waitControllers(p *pki, server string, timeout time.Duration) error {
	client, err := adminClient(p, server)
	if err != nil {
		return err
	}
	ctx := context.Background()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		for _, c := range cp.children {
			if !c.running() {
				return fmt.Errorf("%s exited before the control plane was ready", c.name)
			}
		}
		ready := true
		for _, lease := range []string{"kube-controller-manager", "kube-scheduler"} {
			l, err := client.CoordinationV1().Leases("kube-system").Get(ctx, lease, metav1.GetOptions{})
			if err != nil || l.Spec.HolderIdentity == nil || *l.Spec.HolderIdentity == "" {
				ready = false
			}
		}
		if _, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			ready = false
		}
		if ready {
			return nil
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("the controller manager and the scheduler were not ready in %v", timeout)
}

func (cp *controlPlane) printLogTails() {
	for _, c := range cp.children {
		data, err := os.ReadFile(c.log)
		if err != nil {
			continue
		}
		lines := strings.Split(strings.TrimRight(string(data), "\n"), "\n")
		if len(lines) > 20 {
			lines = lines[len(lines)-20:]
		}
		fmt.Fprintf(os.Stderr, "--- last lines of %s ---\n%s\n", c.log, strings.Join(lines, "\n"))
	}
}

// stop ends the components in reverse order (SIGTERM, SIGKILL after 10 s), closes etcd and
// removes the state directory and the kubeconfig copy.
func (cp *controlPlane) stop() {
	for i := len(cp.children) - 1; i >= 0; i-- {
		c := cp.children[i]
		if c.cmd.Process == nil || !c.running() {
			continue
		}
		_ = c.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-c.done:
		case <-time.After(10 * time.Second):
			_ = syscall.Kill(-c.cmd.Process.Pid, syscall.SIGKILL)
			<-c.done
		}
	}
	if cp.etcd != nil {
		cp.etcd.Close()
	}
	if cp.kubeconfig != "" && !strings.HasPrefix(cp.kubeconfig, cp.dir) {
		os.Remove(cp.kubeconfig)
	}
	os.RemoveAll(cp.dir)
}
